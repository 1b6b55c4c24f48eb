"""``python -m bench.rollout``: k6 ``rollout.js`` while version 2 is promoted beside it.

On a private stack: register a distinguishable second version (the reference package with a
different calibration factor), run ``rollout.js`` once without a promotion (steady p99), then
again while ``heimdall-inference promote 2`` runs ``--promote-after`` seconds in. Prints both
k6 summaries, the p99 ratio and exits non-zero when a request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from bench.service import Stack
from tests.support.procs import REFERENCE, ROOT


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description="rolling swap under load")
    parser.add_argument("--vus", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--promote-after", type=float, default=8.0)
    args = parser.parse_args(argv)
    with Stack() as stack:
        env = {
            **os.environ,
            **{
                k: v
                for k, v in stack.server.env.items()
                if k.startswith(("MLFLOW_", "HEIMDALL_ARTIFACT", "REDIS_"))
            },
        }
        package = stack.folder / "candidate"
        shutil.copytree(REFERENCE, package)
        spec = json.loads((package / "model_spec.json").read_text())
        spec["output"]["calibration_factor"] = 1.25
        (package / "model_spec.json").write_text(json.dumps(spec))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.ops.cli",
                "bootstrap",
                "--package",
                str(package),
                "--alias",
                "candidate",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        print(done.stdout.strip())
        knobs = {"VUS": args.vus, "DURATION": f"{args.seconds}s", "VERSIONS": "1,2"}
        steady = stack.k6("rollout.js", **knobs)
        print("=== steady (no promotion)\n" + steady.summary_text)

        def promote() -> None:
            time.sleep(args.promote_after)
            out = subprocess.run(
                [sys.executable, "-m", "app.ops.cli", "promote", "2"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            print(f"promote: {out.stdout.strip()} {out.stderr[-500:]}".strip(), flush=True)

        thread = threading.Thread(target=promote)
        thread.start()
        swap = stack.k6("rollout.js", **knobs)
        thread.join()
        print("=== during promotion\n" + swap.summary_text)
    p99_steady = steady.value("http_req_duration", "p(99)")
    p99_swap = swap.value("http_req_duration", "p(99)")
    print(
        f"p99 steady {p99_steady:.1f} ms, during swap {p99_swap:.1f} ms, "
        f"ratio {p99_swap / p99_steady:.2f} (design: <= 2); k6 exit codes "
        f"{steady.exit_code}, {swap.exit_code}"
    )
    return swap.exit_code or steady.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
