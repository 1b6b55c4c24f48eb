"""Moving a model alias through a tracking server's REST API, without importing MLflow.

``heimdall-inference promote`` only has to check a version exists and point an alias at it;
importing MLflow and building its client costs seconds (more under load), the two REST calls
a few milliseconds. Used for ``http(s)://`` tracking URIs; a local ``sqlite:///`` registry
has no server to talk to and goes through :class:`app.registry.client.ModelRegistry`.
Authentication follows MLflow's variables: ``MLFLOW_TRACKING_TOKEN`` (bearer) or
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from workers.errors import ModelLoadError, NotFound


def is_remote(tracking_uri: str) -> bool:
    """Whether the registry is a tracking server reachable over HTTP."""
    return tracking_uri.startswith(("http://", "https://"))


class RestAliases:
    """Check versions and set aliases on a tracking server (blocking calls)."""

    def __init__(self, tracking_uri: str, timeout_s: float = 10.0) -> None:
        """Remember the server's base URL."""
        if not is_remote(tracking_uri):
            raise ValueError(f"not an http(s) tracking URI: {tracking_uri}")
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout_s = timeout_s

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user:
            pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - the URL is an http(s) tracking URI
            self.base + path, data=data, method=method, headers=self._headers()
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
            except ValueError:
                error = {}
            message = error.get("message") or f"HTTP {exc.code}"
            if error.get("error_code") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise NotFound(message) from exc
            raise ModelLoadError(f"tracking server: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ModelLoadError(f"tracking server unreachable: {exc}") from exc

    def check_version(self, name: str, version: str) -> None:
        """Raise when ``version`` of ``name`` is not registered.

        Raises:
            NotFound: no such model or version.
            ModelLoadError: the server failed or is unreachable.
        """
        query = urllib.parse.urlencode({"name": name, "version": version})
        self._call("GET", f"model-versions/get?{query}")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``.

        Raises:
            NotFound: no such model or version.
            ModelLoadError: the server failed or is unreachable.
        """
        self._call(
            "POST", "registered-models/alias", {"name": name, "alias": alias, "version": version}
        )

    def check_alias(self, name: str, alias: str) -> str:
        """The version number ``alias`` of ``name`` points at.

        Raises:
            NotFound: no such model or alias.
            ModelLoadError: the server failed or is unreachable.
        """
        query = urllib.parse.urlencode({"name": name, "alias": alias})
        found = self._call("GET", f"registered-models/alias?{query}")
        return str(found.get("model_version", {}).get("version", ""))
