"""``python -m bench.control_verbs``: wall time of the operator verbs, this tree vs another.

Starts a private redis-server, a fresh sqlite registry holding the reference model and the
two MLflow REST endpoints ``promote`` uses (``tests/support/mlflow_rest.py``), then runs
``promote`` (against the tracking server, as in ``compose.yaml``, and against the sqlite
registry), ``route`` and ``status`` in fresh interpreters, interleaving the trees, and
prints the median and max wall time per verb and tree. ``--before DIR`` is a checkout of the
code to compare with (e.g. ``git archive main | tar -x -C /tmp/before``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.__main__ import machine
from tests.support.mlflow_rest import MlflowRestServer
from tests.support.procs import ROOT, RedisServer, bootstrap_registry


def run(tree: Path, env: dict[str, str], *args: str) -> float:
    """Wall time of one verb in a fresh interpreter (fails loudly on a non-zero exit)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", *args],
        env={**os.environ, **env, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed: {done.stderr[-1500:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, default=None, help="a checkout to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    redis = RedisServer()
    redis.start()
    with tempfile.TemporaryDirectory() as folder:
        registry = bootstrap_registry(Path(folder))
        rest = MlflowRestServer(registry["MLFLOW_TRACKING_URI"])
        env = {**registry, "REDIS_URL": redis.url, "HEIMDALL_CONTROL_NAMESPACE": "bench"}
        remote = {**env, "MLFLOW_TRACKING_URI": rest.url}
        alias = f"bench{uuid.uuid4().hex[:6]}"
        verbs = {
            "promote (tracking server)": (remote, ("promote", "1", "--alias", alias)),
            "promote (sqlite registry)": (env, ("promote", "1", "--alias", alias)),
            "route": (env, ("route", "1=1")),
            "status": (env, ("status",)),
        }
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(args.rounds):
                for verb, (verb_env, verb_args) in verbs.items():
                    for name, tree in trees.items():
                        # One namespace per tree: the old code's documents are not the new's.
                        tree_env = {**verb_env, "HEIMDALL_CONTROL_NAMESPACE": f"bench-{name}"}
                        times.setdefault((verb, name), []).append(run(tree, tree_env, *verb_args))
        finally:
            rest.stop()
            redis.stop()
    print(machine())
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    print("| verb | tree | median s | max s | runs |\n| --- | --- | ---: | ---: | ---: |")
    for (verb, name), values in times.items():
        print(
            f"| {verb} | {name} | {statistics.median(values):.2f} | {max(values):.2f} | "
            f"{len(values)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
