"""Open Inference Protocol (KServe V2) routes — being built (issue 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar.handlers import HTTPRouteHandler


def build_oip_routes(components: Any) -> list[HTTPRouteHandler]:
    """Route handlers of the ``/v2`` protocol bound to ``components``."""
    del components
    return []
