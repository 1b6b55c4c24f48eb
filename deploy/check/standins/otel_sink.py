"""Stand-in for the OpenTelemetry collector in `make docker-check`: accepts and counts posts."""

import http.server
import threading

RECEIVED = {"posts": 0}


class Sink(http.server.BaseHTTPRequestHandler):
    """200 to every OTLP/HTTP post; /metrics tells how many arrived."""

    def do_POST(self) -> None:
        """Swallow an export."""
        self.rfile.read(int(self.headers.get("content-length", 0)))
        RECEIVED["posts"] += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        """Prometheus exposition of the count."""
        body = f"otel_sink_posts_total {RECEIVED['posts']}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


if __name__ == "__main__":
    for port in (4317, 8889):
        server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Sink)  # noqa: S104
        threading.Thread(target=server.serve_forever, daemon=True).start()
    http.server.ThreadingHTTPServer(("0.0.0.0", 4318), Sink).serve_forever()  # noqa: S104
