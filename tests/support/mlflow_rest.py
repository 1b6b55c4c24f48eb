"""The MLflow REST endpoints ``promote`` uses, served over a real registry store.

``mlflow-skinny`` (what the service installs) cannot run ``mlflow server`` (no Flask, pandas),
so tests serve MLflow's documented REST shapes for ``model-versions/get``,
``registered-models/get`` (what MLflow's own client also calls) and
``registered-models/alias`` from the test registry through MLflow's own client: the alias
really moves in the registry the replicas read.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class MlflowRestServer:
    """A threaded HTTP server on a free port; :meth:`stop` shuts it down."""

    def __init__(self, tracking_uri: str) -> None:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.calls: list[str] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _guard(self, action: Any) -> None:
                try:
                    self._answer(200, action())
                except MlflowException as exc:
                    status = 404 if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else 400
                    self._answer(status, {"error_code": exc.error_code, "message": exc.message})

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                calls.append(f"GET {url.path}")
                query = dict(urllib.parse.parse_qsl(url.query))

                def version() -> dict[str, Any]:
                    mv = client.get_model_version(query["name"], query["version"])
                    return {
                        "model_version": {
                            "name": mv.name,
                            "version": str(mv.version),
                            "run_id": mv.run_id or "",
                            "creation_timestamp": mv.creation_timestamp,
                            "source": mv.source or "",
                            "tags": [{"key": k, "value": v} for k, v in mv.tags.items()],
                            "aliases": list(mv.aliases),
                        }
                    }

                def model() -> dict[str, Any]:
                    rm = client.get_registered_model(query["name"])
                    aliases = [{"alias": a, "version": str(v)} for a, v in rm.aliases.items()]
                    return {"registered_model": {"name": rm.name, "aliases": aliases}}

                actions = {
                    "/api/2.0/mlflow/model-versions/get": version,
                    "/api/2.0/mlflow/registered-models/get": model,
                }
                if url.path not in actions:
                    return self._answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": ""})
                self._guard(actions[url.path])

            def do_POST(self) -> None:
                calls.append(f"POST {self.path}")
                if self.path != "/api/2.0/mlflow/registered-models/alias":
                    return self._answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": ""})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))

                def alias() -> dict[str, Any]:
                    client.set_registered_model_alias(body["name"], body["alias"], body["version"])
                    return {}

                self._guard(alias)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
