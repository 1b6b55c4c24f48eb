"""Log a training run to MLflow: parameters, per-epoch curves, final figures, the package.

``make train`` runs :mod:`training.train`, which calls :func:`log_training_run` at the end
when a tracking URI is given (``--tracking-uri``, default ``HEIMDALL_REGISTRY_TRACKING_URI``,
the registry ``make run`` serves from). Registering the exported package as a model version
is the CLI's job (``heimdall-inference register``, which ``make train REGISTER=1`` runs after
training), so training never imports the service.

MLflow is imported lazily, and only :class:`mlflow.MlflowClient` is used (no global active
run), so a failed log leaves no state behind in the caller.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

EXPERIMENT = "heimdall-training"
"""Experiment that holds the training runs (``register`` keeps its own, ``heimdall-models``)."""

HISTORY_KEYS = ("train_nll", "val_nll", "val_median_km")
"""Per-epoch figures the trainer records, logged as MLflow metric histories (step = epoch)."""


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of an embedded sqlite registry go beside its file, as ``register`` does.

    Without it MLflow puts them in ``./mlruns`` of whatever directory the trainer runs in
    (the repository, for ``make train`` and the tests). None lets a tracking server decide.
    """
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root.as_uri()
    return None


def flat_metrics(figures: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """The finite numbers in a nested figures document, with dotted keys.

    ``{"coverage": {"0.9": 0.88}}`` → ``{"coverage.0.9": 0.88}``; strings, lists and
    non-finite numbers are left out (MLflow metrics are finite floats; the whole document is
    logged as an artifact anyway).
    """
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, f"{name}."))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                out[name.replace("%", "pct").replace(" ", "_")] = number
    return out


def log_training_run(
    tracking_uri: str,
    *,
    params: Mapping[str, object],
    history: Sequence[Mapping[str, float]],
    figures: Mapping[str, object],
    package_dir: Path,
    run_name: str = "reference",
) -> str:
    """Log one finished training run; returns its run id.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///…``, ``http://…``).
        params: what the run was trained with (sizes, epochs, seed, domain).
        history: one mapping per epoch with :data:`HISTORY_KEYS`.
        figures: the exported package's metrics (calibration, coverage, errors).
        package_dir: the exported package (model.onnx, model_spec.json, README, figures),
            logged as the run's ``package/`` artifacts.
        run_name: the run's display name.

    Raises:
        FileNotFoundError: ``package_dir`` holds no ``model.onnx`` (nothing is logged).
        mlflow.exceptions.MlflowException: MLflow refused part of the run (it is then marked
            FAILED rather than left running).
    """
    import json
    import time

    if not (package_dir / "model.onnx").is_file():
        raise FileNotFoundError(f"no exported package at {package_dir} (model.onnx missing)")

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(EXPERIMENT, artifact_location=_artifact_root(tracking_uri))
    )
    run = client.create_run(experiment_id, run_name=run_name)
    run_id = str(run.info.run_id)
    try:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(epoch[key]), now, step)
            for step, epoch in enumerate(history, start=1)
            for key in HISTORY_KEYS
            if key in epoch and math.isfinite(float(epoch[key]))
        ]
        metrics += [Metric(k, v, now, 0) for k, v in flat_metrics(figures).items()]
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag("heimdall.package", str(package_dir))],
        )
        client.log_text(run_id, json.dumps(figures, indent=2, default=str), "figures.json")
        client.log_artifacts(run_id, str(package_dir), "package")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
