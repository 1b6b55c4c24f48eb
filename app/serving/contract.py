"""A request bound to the version that answers it, checked and packed for a worker.

The served model's spec states what it can answer: the sample rate, how many receivers, how
many samples each, and (for a model trained on one network) which receivers and where. The
check itself is :func:`workers.request.check_capture`, shared with the pool workers, which
run it on the single predictions they decode (issue 23); batch items are checked here, with
the failing field's path, before any work is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.serving.versions import VersionContext
from workers.messages import PredictItem
from workers.request import PredictRequest, check_capture


@dataclass
class Prepared:
    """A request bound to the version that will answer it, ready for a worker."""

    receiver_ids: list[str]
    """Receiver ids in request order, for the answer log."""
    request_id: str
    context: VersionContext
    item: PredictItem
    """The checked, packed captures, or the undecoded body a worker decodes and checks."""


def validate(
    request: PredictRequest, request_id: str, ctx: VersionContext, prefix: str = "$"
) -> Prepared:
    """Check one request against ``ctx``'s capture contract and pack it for a worker.

    Raises:
        InvalidInput: the captures do not fit the model (with the field path).
    """
    item = check_capture(request, ctx.package.spec.capture, ctx.known, ctx.label, prefix)
    return Prepared([rx.id for rx in request.receivers], request_id, ctx, item)
