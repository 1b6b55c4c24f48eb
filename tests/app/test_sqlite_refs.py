"""Version and alias checks read from a real MLflow sqlite registry without MLflow."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from app.registry.sqlite_refs import SqliteRefs, UnknownSchema, sqlite_path
from workers.errors import ModelLoadError, NotFound


@pytest.fixture
def refs(registry_env: dict[str, str], tmp_path: Path) -> SqliteRefs:
    """A copy of the bootstrapped registry (reference model, version 1, @production)."""
    source = sqlite_path(registry_env["MLFLOW_TRACKING_URI"])
    assert source is not None and source.is_file()
    return SqliteRefs(Path(shutil.copy(source, tmp_path / "mlflow.db")))


def test_uris_name_their_database_file() -> None:
    assert sqlite_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_path("sqlite:////var/lib/mlflow.db") == Path("/var/lib/mlflow.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://mlflow:5000") is None


def test_registered_versions_and_aliases_pass_and_others_are_not_found(refs: SqliteRefs) -> None:
    refs.check_version("rf-localizer", "1")
    refs.check_alias("rf-localizer", "production")
    with pytest.raises(NotFound, match="'2' is not in the registry"):
        refs.check_version("rf-localizer", "2")
    with pytest.raises(NotFound, match="'@staging' is not in the registry"):
        refs.check_alias("rf-localizer", "staging")
    with pytest.raises(NotFound):
        refs.check_version("other-model", "1")


def test_a_deleted_version_is_not_found(refs: SqliteRefs) -> None:
    # MLflow keeps a deleted version's row with the stage Deleted_Internal.
    with sqlite3.connect(refs.path) as db:
        db.execute("UPDATE model_versions SET current_stage = 'Deleted_Internal'")
    with pytest.raises(NotFound):
        refs.check_version("rf-localizer", "1")


def test_other_databases_are_left_to_mlflow_and_missing_ones_are_unavailable(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(UnknownSchema):
        SqliteRefs(other).check_version("rf-localizer", "1")
    with pytest.raises(ModelLoadError, match="no MLflow registry database"):
        SqliteRefs(tmp_path / "missing.db").check_alias("rf-localizer", "production")
