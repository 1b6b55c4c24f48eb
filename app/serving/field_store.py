"""Per-version field figures in Redis: counts, the latest samples, the sources.

Per model version: counts (total, inside each ellipse, per source) in a hash and a bounded
list of the latest samples (``d²``, error) for quantiles and for ``heimdall-inference
recalibrate``. :meth:`FieldStore.figures` is the read API for ``/v1/models/{version}`` and
for canary gates; :class:`app.serving.feedback.FeedbackService` writes them. Keys (prefix
``HEIMDALL_FEEDBACK_PREFIX``): ``figures:{model}:{version}`` (hash), ``samples:{model}:
{version}`` (list, capped), ``sources:{model}:{version}`` (set, capped).
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from msgspec import Struct

from app.serving.feedback_settings import FeedbackSettings
from app.serving.field import LEVELS, level_key, summarise


class FieldSample(Struct, array_like=True, frozen=True):
    """One feedback sample of a version: what recalibration and quantiles read."""

    request_id: str
    d2: float
    error_m: float
    source: str
    domain_inside: bool
    observed_at: float


_sample_decoder = msgspec.msgpack.Decoder(FieldSample)


def field_keys(prefix: str, model: str, version: str) -> tuple[str, str, str]:
    """(figures hash, samples list, sources set) of one version."""
    return (
        f"{prefix}figures:{model}:{version}",
        f"{prefix}samples:{model}:{version}",
        f"{prefix}sources:{model}:{version}",
    )


def _share(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


class FieldStore:
    """Per-version field figures in Redis: counts, the latest samples, the sources."""

    def __init__(self, settings: FeedbackSettings, client: Any) -> None:
        """Read and write through ``client`` (``redis.asyncio.Redis``)."""
        self.settings = settings
        self.client = client

    async def samples(self, model: str, version: str) -> list[FieldSample]:
        """The latest samples of ``version`` (newest first); undecodable entries skipped."""
        _, samples_key, _ = field_keys(self.settings.prefix, model, version)
        out = []
        for raw in await self.client.lrange(samples_key, 0, -1):
            with contextlib.suppress(msgspec.DecodeError):
                out.append(_sample_decoder.decode(raw))
        return out

    async def figures(self, model: str, version: str) -> dict[str, Any]:
        """Field figures of one version, as every replica sees them.

        ``count`` and ``coverage`` cover every feedback ever received for the version;
        ``error_m`` and ``mahalanobis`` quantiles the latest ``samples`` (at most
        ``max_samples``); ``sources`` the same per source. This is what canary gates read
        (candidate vs current version).
        """
        figures_key, _, sources_key = field_keys(self.settings.prefix, model, version)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(figures_key)
            pipe.smembers(sources_key)
            counts_raw, sources_raw = await pipe.execute()
        counts = {k.decode(): int(v) for k, v in counts_raw.items()}
        sources = {s.decode() for s in sources_raw}
        samples = await self.samples(model, version)
        out = self._section(counts, "", samples)
        out["model"] = model
        out["version"] = version
        per_source: dict[str, Any] = {}
        for name in sorted(
            # `src:{name}:n`: a name may hold ':' (the Source pattern allows it).
            {k[4:-2] for k in counts if k.startswith("src:") and k.endswith(":n")}
        ):
            own = [s for s in samples if (s.source if s.source in sources else "other") == name]
            per_source[name] = self._section(counts, f"src:{name}:", own)
        out["sources"] = per_source
        return out

    @staticmethod
    def _section(counts: dict[str, int], prefix: str, samples: list[FieldSample]) -> dict[str, Any]:
        total = counts.get(prefix + "n", 0)
        recent = summarise([s.d2 for s in samples], [s.error_m for s in samples])
        return {
            "count": total,
            "coverage": {
                level_key(p): _share(counts.get(f"{prefix}in:{level_key(p)}", 0), total)
                for p in LEVELS
            },
            "inside": {level_key(p): counts.get(f"{prefix}in:{level_key(p)}", 0) for p in LEVELS},
            "outside_domain": counts.get(prefix + "outside_domain", 0),
            "samples": recent.get("samples", 0),
            "error_m": recent.get("error_m"),
            "mahalanobis": recent.get("mahalanobis"),
        }
