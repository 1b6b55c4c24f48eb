"""``heimdall-inference recalibrate VERSION``: a field-fitted covariance scale, as a new version.

Reads the version's feedback samples from Redis (what ``POST /v1/feedback`` recorded),
splits them by request id into a fit half and a held-out half, fits one scale ``s`` on the
fit half (:func:`app.serving.field.fit_scale`, with a bootstrap interval), and registers a new
model version: the same ``model.onnx`` and a spec whose sigmas come out ``s`` times larger
(``output.calibration_factor × s``; the spread table's knots and the out-of-domain sigma
floor move with it, so the covariance of every answer is exactly ``s²`` times the parent's)
and whose provenance records the calibration. Prints coverage before and after on the
held-out half. Method: docs/field-calibration.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.registry.authoring import register_package
from app.registry.package import MODEL_FILE, SPEC_FILE, LocalPackage
from app.serving.field import LEVELS, bootstrap_scale, coverage, fit_scale, level_key, split_halves
from app.serving.field_store import FieldSample, FieldStore
from app.settings import Settings, load_settings
from workers.spec import decode_spec

METHOD = (
    "one scale s on the covariance (sigmas x s); s minimises the largest coverage error "
    "over the levels in binomial standard errors (|coverage - p| / sqrt(p(1-p))) on a "
    "fit half of the feedback split by a hash of the request id; 95 % percentile bootstrap "
    "interval (200 resamples of the fit half); coverage measured on the held-out half"
)


@dataclass(frozen=True)
class Recalibration:
    """A fitted scale and what it does on the held-out feedback."""

    scale: float
    ci95: tuple[float, float]
    levels: tuple[float, ...]
    fit_samples: int
    held_out_samples: int
    before: dict[str, float]
    after: dict[str, float]


def recalibrate(
    samples: list[FieldSample], levels: tuple[float, ...] = LEVELS, seed: int = 0
) -> Recalibration:
    """Fit the scale on one half of ``samples`` and measure it on the other.

    Samples are ordered by request id first, so the same feedback gives the same figures
    (and bootstrap interval) whatever order Redis returned it in.
    """
    samples = sorted(samples, key=lambda s: s.request_id)
    fit_rows, held_rows = split_halves([s.request_id for s in samples])
    d2 = np.array([s.d2 for s in samples], dtype=np.float64)
    scale = fit_scale(d2[fit_rows], levels)
    low, high = bootstrap_scale(d2[fit_rows], levels, seed=seed)
    return Recalibration(
        scale=scale,
        ci95=(low, high),
        levels=levels,
        fit_samples=len(fit_rows),
        held_out_samples=len(held_rows),
        before=coverage(d2[held_rows]),
        after=coverage(d2[held_rows], scale),
    )


def scaled_spec(raw: bytes, result: Recalibration, parent: str, source: str, total: int) -> bytes:
    """The parent's spec with sigmas ``result.scale`` times larger and the provenance."""
    doc: dict[str, Any] = json.loads(raw)
    s = result.scale
    output = doc["output"]
    output["calibration_factor"] = float(output.get("calibration_factor", 1.0)) * s
    table = output.get("calibration")
    if table:  # looked up at the scaled sigma: shift the knots so the factor is unchanged
        table["log_sigma_m"] = [k + math.log(s) for k in table["log_sigma_m"]]
    domain = doc.get("domain")
    if domain and "out_of_domain_min_sigma_m" in domain:
        domain["out_of_domain_min_sigma_m"] = float(domain["out_of_domain_min_sigma_m"]) * s
    provenance = doc.setdefault("provenance", {})
    provenance.setdefault("field_calibrations", []).append(
        {
            "scale": s,
            "scale_ci95": list(result.ci95),
            "method": METHOD,
            "levels": list(result.levels),
            "samples": total,
            "fit_samples": result.fit_samples,
            "held_out_samples": result.held_out_samples,
            "held_out_coverage_before": result.before,
            "held_out_coverage_after": result.after,
            "source": source,
            "parent_version": parent,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    encoded = (json.dumps(doc, indent=2) + "\n").encode()
    decode_spec(encoded)  # the result must be a servable spec
    return encoded


async def _read_samples(settings: Settings, model: str, version: str) -> list[FieldSample]:
    import redis.asyncio as aioredis

    if not settings.cache.redis_url:
        raise SystemExit("REDIS_URL is empty: the feedback samples are in Redis")
    client = aioredis.from_url(settings.cache.redis_url, socket_timeout=30)
    try:
        return await FieldStore(settings.feedback, client).samples(model, version)
    finally:
        await client.aclose()


def _register(registry: Any, package: LocalPackage, spec: bytes, name: str) -> str:
    with tempfile.TemporaryDirectory(prefix="heimdall-recal-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(package.model_path, folder / MODEL_FILE)
        (folder / SPEC_FILE).write_bytes(spec)
        return register_package(registry, folder, name, alias=None)


def _row(label: str, figures: dict[str, float]) -> str:
    cells = "".join(f"{figures[level_key(p)] * 100:>8.1f}" for p in LEVELS)
    return f"  {label:<28}{cells}"


def cmd_recalibrate(args: argparse.Namespace) -> int:
    """Fit a covariance scale on field feedback and register it as a new version."""
    from app.registry.client import ModelRegistry

    settings = load_settings()
    registry = ModelRegistry(settings.registry)
    name = settings.registry.model_name()
    info = registry.resolve(str(args.version))
    samples = asyncio.run(_read_samples(settings, name, info.version))
    if args.source:
        samples = [s for s in samples if s.source == args.source]
    source = args.source or "all"
    if len(samples) < args.min_samples:
        print(
            f"{name} v{info.version} has {len(samples)} feedback samples (source: {source}); "
            f"--min-samples is {args.min_samples}: not enough to fit a calibration"
        )
        return 3
    levels = tuple(float(x) for x in args.levels.split(","))
    result = recalibrate(samples, levels, seed=args.seed)
    print(
        f"field recalibration of {name} v{info.version}: {len(samples)} feedback samples "
        f"(source: {source}), fit on {result.fit_samples}, held out {result.held_out_samples}"
    )
    print(
        f"scale s = {result.scale:.4f} on the sigmas (covariance x {result.scale**2:.4f}), "
        f"95 % bootstrap interval {result.ci95[0]:.4f}-{result.ci95[1]:.4f}, fitted to "
        f"{'/'.join(f'{p * 100:g}' for p in levels)} %"
    )
    print(f"  {'held-out coverage (%)':<28}" + "".join(f"{p * 100:>8g}" for p in LEVELS))
    print(_row(f"before (v{info.version})", result.before))
    print(_row(f"after (s = {result.scale:.3f})", result.after))
    if args.dry_run:
        print("dry run: nothing registered")
        return 0
    package = registry.fetch(info)
    spec = scaled_spec(package.spec_raw, result, info.version, source, len(samples))
    version = _register(registry, package, spec, name)
    print(
        f"registered {name} version {version} (no alias); serve it with: "
        f"heimdall-inference promote {version}"
    )
    return 0
