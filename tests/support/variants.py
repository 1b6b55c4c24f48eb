"""Register extra model versions (good and deliberately broken) in a test registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from app.registry.authoring import register_package
from app.registry.client import ModelRegistry, RegistrySettings
from app.registry.package import SHA256_TAG
from tests.support.procs import REFERENCE


def registry(env: dict[str, str]) -> ModelRegistry:
    """A registry client for a test registry's env."""
    return ModelRegistry(
        RegistrySettings(
            tracking_uri=env["MLFLOW_TRACKING_URI"], artifact_cache=env["HEIMDALL_ARTIFACT_CACHE"]
        )
    )


def register_variant(
    env: dict[str, str], folder: Path, kind: str = "good", calibration: float = 1.5
) -> str:
    """Register a copy of the reference package, altered by ``kind``; returns the version.

    Kinds: ``good`` (a different calibration factor: a distinguishable, valid model),
    ``corrupt`` (model.onnx bytes are garbage), ``bad_sha`` (the sha256 tag lies),
    ``bad_shape`` (the spec declares a tensor shape the graph does not have),
    ``nan_outputs`` (a graph with the right signature whose outputs are NaN),
    ``flaky`` (the reference graph, but NaN positions for captures with 7 receivers: it loads
    and warms up, then fails a share of requests).
    """
    target = folder / f"{kind}-{calibration}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(REFERENCE, target)
    spec = json.loads((target / "model_spec.json").read_text())
    spec["output"]["calibration_factor"] = calibration
    if kind == "corrupt":
        (target / "model.onnx").write_bytes(b"\x08\x07this is not an onnx graph" * 100)
    if kind == "bad_shape":
        spec["inputs"]["receivers"]["shape"] = [-1, 7, 3]
    if kind == "nan_outputs":
        (target / "model.onnx").write_bytes(nan_model())
    if kind == "flaky":
        (target / "model.onnx").write_bytes(flaky_model(target / "model.onnx", above=6.5))
    (target / "model_spec.json").write_text(json.dumps(spec, indent=2))
    reg = registry(env)
    version = register_package(reg, target, "rf-localizer", alias=None)
    if kind == "bad_sha":
        reg.client.set_model_version_tag("rf-localizer", version, SHA256_TAG, "0" * 64)
    return version


def nan_model() -> bytes:
    """An ONNX graph with the reference signature that answers NaN for everything."""
    from onnx import TensorProto, helper

    batch = "batch"
    inputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 7, 32, 32]),
        helper.make_tensor_value_info("receivers", TensorProto.FLOAT, [batch, 7, 2]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 7]),
    ]
    outputs = [
        helper.make_tensor_value_info("mean", TensorProto.FLOAT, [batch, 2]),
        helper.make_tensor_value_info("sigma", TensorProto.FLOAT, [batch, 2]),
        helper.make_tensor_value_info("rho", TensorProto.FLOAT, [batch]),
    ]
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("ReduceSum", ["receivers", "axis"], ["pos"], keepdims=0),
        helper.make_node("Mul", ["pos", "nan"], ["mean"]),
        helper.make_node("Mul", ["pos", "nan"], ["sigma"]),
        helper.make_node("ReduceSum", ["mask", "axis"], ["count"], keepdims=0),
        helper.make_node("Mul", ["count", "nan"], ["rho"]),
    ]
    graph = helper.make_graph(nodes, "nan", inputs, outputs, initializer=[nan, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def flaky_model(path: Path, above: float) -> bytes:
    """The graph at ``path`` with its ``mean`` output NaN where more than ``above`` receivers."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["mean_raw" if o == "mean" else o for o in node.output]
        node.input[:] = ["mean_raw" if i == "mean" else i for i in node.input]
    graph.initializer.extend(
        [
            helper.make_tensor("flaky_axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("flaky_above", TensorProto.FLOAT, [], [above]),
            helper.make_tensor("flaky_nan", TensorProto.FLOAT, [], [float("nan")]),
            helper.make_tensor("flaky_one", TensorProto.FLOAT, [], [1.0]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceSum", ["mask", "flaky_axis"], ["flaky_count"], keepdims=1),
            helper.make_node("Greater", ["flaky_count", "flaky_above"], ["flaky_cond"]),
            helper.make_node("Where", ["flaky_cond", "flaky_nan", "flaky_one"], ["flaky_f"]),
            helper.make_node("Mul", ["mean_raw", "flaky_f"], ["mean"]),
        ]
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
