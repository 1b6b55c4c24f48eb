"""Reading versions and aliases of a local ``sqlite:///`` registry, without MLflow.

``route``, ``shadow`` and ``canary`` refuse to publish a version the registry lacks, and a
replica resolves the version it serves at start and on every rollout. Through MLflow each of
these costs an MLflow import and client (7.5 s + 4.2 s on the 2-core VM: a replica was ready
after 16 s, 12 of them MLflow's); reading the registry's tables with the standard library
costs milliseconds. Read-only: writes (``promote``'s alias, registering) still go through
MLflow. A database whose tables are not MLflow's registry schema as read here (an older
MLflow's, before its ``workspace`` column) raises :class:`UnknownSchema`, and the caller asks
MLflow instead, which also migrates it.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

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
    """Read-only lookups in the registry tables of an MLflow sqlite database."""

    def __init__(self, path: Path) -> None:
        """Read ``path`` (opened read-only, per call) in MLflow's ``default`` workspace.

        The only one MLflow uses while workspaces are off (see :func:`workspaces_enabled`).
        """
        self.path = path

    def _rows(
        self, queries: list[tuple[str, tuple[str | int, ...]]]
    ) -> list[list[tuple[Any, ...]]]:
        """Every row of each query, in one read-only connection (one consistent read).

        Raises:
            ModelLoadError: the database is missing or cannot be read.
            UnknownSchema: not MLflow's registry tables.
        """
        if not self.path.is_file():
            raise ModelLoadError(f"no MLflow registry database at {self.path}")
        try:
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"  # a ? or # in a folder
            with sqlite3.connect(uri, uri=True, timeout=10) as db:
                db.execute("BEGIN")
                return [db.execute(query, args).fetchall() for query, args in queries]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc) or "no such column" in str(exc):
                raise UnknownSchema(str(exc)) from exc
            raise ModelLoadError(f"MLflow registry database {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise ModelLoadError(f"MLflow registry database {self.path}: {exc}") from exc

    def model_version(self, name: str, version: str | None, alias: str | None) -> dict[str, Any]:
        """One version (by number or by alias), shaped as MLflow's REST ``model_version``.

        As MLflow's store answers: ``@latest`` (any case) is the highest version not deleted,
        and a registered model that no longer exists has no versions.

        Raises:
            NotFound: no such model, version or alias, or the version was deleted.
            ModelLoadError: the database is missing or cannot be read.
            UnknownSchema: not MLflow's registry tables as read here.
        """
        if alias is not None and alias.lower() == "latest":
            rows = self._rows(
                [
                    (
                        "SELECT MAX(version) FROM model_versions WHERE name = ?"
                        " AND workspace = 'default' AND current_stage != ?"
                        " AND EXISTS (SELECT 1 FROM registered_models r"
                        " WHERE r.name = ? AND r.workspace = 'default')",
                        (name, DELETED, name),
                    )
                ]
            )[0]
            if not rows or rows[0][0] is None:
                raise NotFound(f"{name!r} has no version")
            version = str(rows[0][0])
        elif alias is not None:
            rows = self._rows(
                [
                    (
                        "SELECT version FROM registered_model_aliases"
                        " WHERE name = ? AND alias = ? AND workspace = 'default'",
                        (name, alias),
                    )
                ]
            )[0]
            if not rows:
                raise NotFound(f"{name!r} has no alias {alias!r}")
            version = str(rows[0][0])
        if version is None or not _version_number(version):
            raise NotFound(f"{name!r} has no version {version}")
        key = (name, int(version))
        found, tags, aliases = self._rows(
            [
                (
                    "SELECT name, version, creation_time, source, run_id FROM model_versions"
                    " WHERE name = ? AND version = ? AND workspace = 'default'"
                    " AND current_stage != ? AND EXISTS (SELECT 1 FROM registered_models r"
                    " WHERE r.name = ? AND r.workspace = 'default')",
                    (*key, DELETED, name),
                ),
                (
                    "SELECT key, value FROM model_version_tags"
                    " WHERE name = ? AND version = ? AND workspace = 'default'",
                    key,
                ),
                (
                    "SELECT alias FROM registered_model_aliases"
                    " WHERE name = ? AND version = ? AND workspace = 'default'",
                    key,
                ),
            ]
        )
        if not found:
            raise NotFound(f"{name!r} has no version {version}")
        row = found[0]
        return {
            "name": row[0],
            "version": str(row[1]),
            "creation_timestamp": int(row[2] or 0),
            "source": row[3] or "",
            "run_id": row[4] or "",
            "tags": [{"key": k, "value": v} for k, v in tags],
            "aliases": sorted(a for (a,) in aliases),
        }

    def check_version(self, name: str, version: str) -> None:
        """Raise when ``version`` of ``name`` is not registered or deleted.

        Raises:
            NotFound: not registered, or deleted.
            ModelLoadError: the database is missing or cannot be read.
            UnknownSchema: not MLflow's registry tables as read here.
        """
        try:
            self.model_version(name, version, None)
        except NotFound as exc:
            raise NotFound(f"'{version}' is not in the registry: {exc}") from exc

    def check_alias(self, name: str, alias: str) -> str:
        """The version number ``alias`` of ``name`` points at (raises as :meth:`check_version`)."""
        try:
            return str(self.model_version(name, None, alias)["version"])
        except NotFound as exc:
            raise NotFound(f"'@{alias}' is not in the registry: {exc}") from exc


def _version_number(text: str) -> bool:
    """ASCII digits within SQLite's INTEGER (MLflow's version numbers)."""
    return text.isascii() and text.isdigit() and int(text) < 2**63


def workspaces_enabled() -> bool:
    """Whether MLflow's workspaces are on (then only MLflow knows which one is active)."""
    return os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() in ("1", "true")
