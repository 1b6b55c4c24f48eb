"""``make train`` logs its run to MLflow (issue 20): a real sqlite registry, read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.tracking import EXPERIMENT, flat_metrics, log_training_run

REFERENCE = Path(__file__).resolve().parents[2] / "training" / "reference"


def test_flat_metrics_keeps_finite_numbers_with_dotted_keys() -> None:
    figures = {
        "median_error_km": 17.2,
        "coverage": {"0.5": 0.52, "0.9": 0.89},
        "note": "text is an artifact, not a metric",
        "nan": float("nan"),
        "flag": True,
        "list": [1, 2],
    }
    assert flat_metrics(figures) == {
        "median_error_km": 17.2,
        "coverage.0.5": 0.52,
        "coverage.0.9": 0.89,
    }


def test_a_training_run_is_logged_with_params_curves_figures_and_the_package(
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    history = [
        {"train_nll": 3.0 - e, "val_nll": 3.2 - e, "val_median_km": 30.0 - 5 * e} for e in range(3)
    ]
    run_id = log_training_run(
        uri,
        params={"epochs": 3, "seed": 1, "train_captures": 1000},
        history=history,
        figures={"median_error_km": 17.2, "coverage": {"0.9": 0.887}},
        package_dir=REFERENCE,
    )

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params == {"epochs": "3", "seed": "1", "train_captures": "1000"}
    assert run.data.metrics["median_error_km"] == 17.2
    assert run.data.metrics["coverage.0.9"] == 0.887
    curve = client.get_metric_history(run_id, "val_median_km")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [
        (1, 30.0),
        (2, 25.0),
        (3, 20.0),
    ]
    logged = {a.path for a in client.list_artifacts(run_id, "package")}
    assert {"package/model.onnx", "package/model_spec.json"} <= logged
    assert "figures.json" in {a.path for a in client.list_artifacts(run_id)}
    # Beside the registry file, not in ./mlruns of the directory the trainer ran in.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri()), run.info


def test_a_missing_package_logs_nothing(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match=r"model\.onnx"):
        log_training_run(uri, params={}, history=[], figures={}, package_dir=tmp_path)
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT) is None


def test_a_run_mlflow_refuses_is_marked_failed_not_left_running(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(MlflowException):
        log_training_run(
            uri, params={"no?such*name": 1}, history=[], figures={}, package_dir=REFERENCE
        )
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
