"""Checking that versions and aliases exist in a local ``sqlite:///`` registry, without MLflow.

``route``, ``shadow`` and ``canary`` refuse to publish a version the registry lacks. Through
MLflow that check costs an MLflow import and client (≈ 5 s of CPU on a small VM); reading
the registry's two tables with the standard library costs milliseconds. Read-only: writes
(``promote``'s alias) still go through MLflow. A database whose tables are not MLflow's
registry schema raises :class:`UnknownSchema`, and the caller asks MLflow instead.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workers.errors import ModelLoadError, NotFound

DELETED = "Deleted_Internal"
"""The stage MLflow gives a model version it deleted but keeps in its table."""


class UnknownSchema(Exception):
    """The database does not hold MLflow's registry tables as this module reads them."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URI."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


class SqliteRefs:
    """Existence checks against the registry tables of an MLflow sqlite database."""

    def __init__(self, path: Path) -> None:
        """Read ``path`` (opened read-only, per call)."""
        self.path = path

    def require(self, missing: str, query: str, args: tuple[str | int, ...]) -> None:
        """Raise :class:`NotFound` with the message ``missing`` when ``query`` finds no row.

        Raises:
            NotFound: no row.
            ModelLoadError: the database cannot be read.
            UnknownSchema: not MLflow's registry tables.
        """
        if not self.path.is_file():
            raise ModelLoadError(f"no MLflow registry database at {self.path}")
        try:
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10) as db:
                found = db.execute(query, args).fetchone() is not None
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc) or "no such column" in str(exc):
                raise UnknownSchema(str(exc)) from exc
            raise ModelLoadError(f"MLflow registry database {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise ModelLoadError(f"MLflow registry database {self.path}: {exc}") from exc
        if not found:
            raise NotFound(missing)

    def check_version(self, name: str, version: str) -> None:
        """Raise (see :meth:`require`) when ``version`` of ``name`` is not registered or deleted."""
        self.require(
            f"'{version}' is not in the registry: {name!r} has no version {version}",
            "SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND current_stage != ?",
            (name, int(version), DELETED),
        )

    def check_alias(self, name: str, alias: str) -> None:
        """Raise (see :meth:`require`) when ``alias`` of ``name`` points at no version."""
        self.require(
            f"'@{alias}' is not in the registry: {name!r} has no alias {alias!r}",
            "SELECT 1 FROM registered_model_aliases WHERE name = ? AND alias = ?",
            (name, alias),
        )
