"""Export a trained :class:`training.train.Localizer` as an ONNX model package.

Writes ``model.onnx`` (opset 17, dynamic ``batch`` axis) and ``model_spec.json`` beside it,
checks that ONNX Runtime matches torch to 1e-4 and that the spec decodes, and evaluates the
package on fresh captures for the spec's provenance figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.dataset import PackedSet, build_spec
from training.evaluate import evaluate, load_package, run_session
from workers.spec import ModelSpec, decode_spec, encode_spec

INPUT_NAMES = ("features", "receivers", "mask")
OUTPUT_NAMES = ("mean", "sigma", "rho")
EVAL_SEED = 3
EVAL_CAPTURES = 2_000


def export_onnx(model: nn.Module, spec: ModelSpec, path: Path) -> None:
    """Export ``model`` to ``path`` with named inputs/outputs and a dynamic batch axis."""
    k, f, b = spec.capture.max_receivers, spec.features.n_frames, spec.features.n_bands
    example = (torch.zeros(2, k, f, b), torch.zeros(2, k, 2), torch.ones(2, k))
    axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    model.eval()
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )


def check_parity(model: nn.Module, directory: Path, data: PackedSet, n: int = 256) -> float:
    """Largest absolute difference between torch and ONNX Runtime outputs on ``n`` samples."""
    session, spec = load_package(directory)
    inputs = (data.features[:n], data.receivers[:n], data.mask[:n])
    ort_out = run_session(session, spec, *inputs)
    with torch.no_grad():
        torch_out = model(*(torch.from_numpy(a) for a in inputs))
    diff = max(
        float(np.max(np.abs(a - b.numpy()))) for a, b in zip(ort_out, torch_out, strict=True)
    )
    if diff > 1e-4:
        raise RuntimeError(f"ONNX Runtime differs from torch by {diff:g}")
    return diff


def export_package(
    model: nn.Module,
    spec: ModelSpec,
    calibration_factor: float,
    out: Path,
    training_data: str,
    seed: int,
    val: PackedSet,
) -> dict[str, float]:
    """Write ``model.onnx`` and ``model_spec.json`` to ``out`` and return the figures.

    Args:
        model: trained network.
        spec: spec with the final feature normalisation (its provenance is replaced).
        calibration_factor: fitted sigma multiplier.
        out: package directory.
        training_data: description for the provenance.
        seed: training seed.
        val: validation data, used for the torch/ONNX parity check.

    Returns:
        The metrics written into the spec's provenance.
    """
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, spec, out / "model.onnx")
    n_params = sum(p.numel() for p in model.parameters())
    final = build_spec(spec.features, calibration_factor, training_data, seed)
    (out / "model_spec.json").write_bytes(encode_spec(final))
    diff = check_parity(model, out, val)
    session, _ = load_package(out)
    figures = evaluate(session, final, EVAL_CAPTURES, EVAL_SEED).metrics()
    metrics: dict[str, float] = {
        **figures,
        "eval_captures": EVAL_CAPTURES,
        "eval_seed": EVAL_SEED,
        "calibration_factor": round(calibration_factor, 4),
        "n_params": n_params,
        "onnx_bytes": (out / "model.onnx").stat().st_size,
        "onnx_torch_max_abs_diff": diff,
    }
    final = build_spec(spec.features, calibration_factor, training_data, seed, metrics)
    raw = encode_spec(final)
    decode_spec(raw)
    (out / "model_spec.json").write_bytes(raw)
    return metrics
