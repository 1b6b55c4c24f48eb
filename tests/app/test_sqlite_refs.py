"""Version and alias checks read from a real MLflow sqlite registry without MLflow."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.registry.client import parse_ref
from app.registry.sqlite_refs import SqliteRefs, UnknownSchema, sqlite_path
from tests.support.procs import ROOT, bootstrap_registry
from workers.errors import ModelLoadError, NotFound


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """This module's own registry: other modules register versions and aliases in the
    session's, and these tests read exactly which versions and aliases exist (with
    pytest-xdist they may run after those modules)."""
    return bootstrap_registry(tmp_path_factory.mktemp("pristine"))


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


def test_a_database_in_a_folder_named_like_a_uri_is_read(
    registry_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "a?b#c%20d"
    folder.mkdir()
    source = sqlite_path(registry_env["MLFLOW_TRACKING_URI"])
    refs = SqliteRefs(Path(shutil.copy(source, folder / "mlflow.db")))
    assert refs.model_version("rf-localizer", None, "production")["version"] == "1"


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


def test_a_replica_reads_the_same_version_as_mlflow_without_importing_it(
    registry_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving through the tables gives what MLflow's client gives, field for field.

    Then, in a fresh interpreter like a starting replica: resolve the alias, fetch the
    package from its local ``file://`` artifacts into an empty cache and again from the
    cache, all verified by sha256, and MLflow is never imported.
    """
    from app.registry.client import ModelRegistry, RegistrySettings

    db = Path(shutil.copy(sqlite_path(registry_env["MLFLOW_TRACKING_URI"]), tmp_path / "m.db"))
    uri = f"sqlite:///{db}"
    registry = ModelRegistry(RegistrySettings(tracking_uri=uri, artifact_cache=str(tmp_path)))
    registry.set_alias("rf-localizer", "candidate", "1")
    # MLflow ignores MLFLOW_WORKSPACE while its workspaces are off; the reader must too.
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    for ref in ("models:/rf-localizer@production", "@candidate", "1", "@latest", "@LATEST"):
        name, version, alias = parse_ref(ref, "rf-localizer")
        through_mlflow = registry._resolve_with_mlflow(ref, name, version, alias)
        through_tables = registry.resolve(ref)
        assert through_tables == dataclasses.replace(
            through_mlflow, aliases=sorted(through_mlflow.aliases)
        )
        assert through_tables.aliases == ["candidate", "production"]
        assert len(through_tables.sha256) == 64 and through_tables.source.startswith("file://")

    script = textwrap.dedent(
        f"""
        import sys
        from app.registry.client import ModelRegistry, RegistrySettings
        registry = ModelRegistry(
            RegistrySettings(tracking_uri={uri!r}, artifact_cache={str(tmp_path / "cache")!r})
        )
        info = registry.resolve("@production")
        first, again = registry.fetch(info), registry.fetch(info)
        assert first.model_path == again.model_path and first.model_path.is_file()
        print(info.version, first.spec_hash, "mlflow" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    version, digest, imported = done.stdout.split()
    assert (version, imported) == ("1", "False")
    assert digest == through_tables.spec_hash


def test_a_version_the_tables_lack_is_not_found_with_the_reference_named(
    registry_env: dict[str, str], tmp_path: Path
) -> None:
    from app.registry.client import ModelRegistry, RegistrySettings

    db = Path(shutil.copy(sqlite_path(registry_env["MLFLOW_TRACKING_URI"]), tmp_path / "m.db"))
    registry = ModelRegistry(
        RegistrySettings(tracking_uri=f"sqlite:///{db}", artifact_cache=str(tmp_path))
    )
    with pytest.raises(NotFound, match=r"^'@staging' is not in the registry: .* no alias"):
        registry.resolve("@staging")
    with pytest.raises(NotFound, match=r"^'9' is not in the registry: .* no version 9"):
        registry.resolve("9")
    for huge in ("99999999999999999999", "models:/rf-localizer/99999999999999999999"):
        with pytest.raises(NotFound):
            registry.resolve(huge)  # beyond SQLite's INTEGER
    with pytest.raises(ValueError, match="is not models:/NAME@ALIAS"):
        registry.resolve("²")  # a digit to str.isdigit, not a version number
    with sqlite3.connect(db) as conn:  # the model's own row gone: MLflow says not found
        conn.execute("DELETE FROM registered_models")
    with pytest.raises(NotFound):
        registry.resolve("@production")
    with pytest.raises(NotFound):
        registry.resolve("@latest")
    shutil.copy(sqlite_path(registry_env["MLFLOW_TRACKING_URI"]), db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE model_versions SET current_stage = 'Deleted_Internal'")
    with pytest.raises(NotFound):
        registry.resolve("@production")
