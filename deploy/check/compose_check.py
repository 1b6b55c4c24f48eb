"""``make docker-check`` (full): the compose stack brought up for real on the private engine.

compose.yaml as users run it, plus ``compose.check.yaml`` which only swaps the upstream images
(unreachable here) for stand-ins built from Debian packages and leaves Grafana out. Then:
predictions through the nginx load balancer, Prometheus scraping both replicas, and
``heimdall-inference promote`` of a second model version rolling out to both replicas while a
short load runs through the load balancer, with every request counted, and a promotion after
Redis lost its data in a restart.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker_check as dc

HERE = Path(__file__).resolve().parent
PROJECT = "heimdall-check"
COMPOSE = "/usr/bin/docker-compose"
LB = "http://127.0.0.1:8080"
STANDINS = ("redis", "nginx", "prometheus", "mlflow", "otel-sink")
# A second, distinguishable version: the reference package with another calibration factor.
MAKE_V2 = (
    "import json, shutil; from app.ops.cli import REFERENCE_PACKAGE as ref; "
    "shutil.copytree(ref, '/tmp/v2'); p = '/tmp/v2/model_spec.json'; s = json.load(open(p)); "
    "s['output']['calibration_factor'] = 1.25; json.dump(s, open(p, 'w'))"
)


def build_standins(engine: dc.Engine, log: Callable[[str], None]) -> None:
    """heimdall-check/* images from deploy/check/standins (cached layers after the first run)."""
    compose = (dc.ROOT / "compose.yaml").read_text()
    mlflow = re.search(r"image: ghcr.io/mlflow/mlflow:v(\S+)", compose)
    uv = re.search(r"^FROM (ghcr.io/astral-sh/uv:\S+) AS uv", dc.dockerfile_text(), re.M)
    tags = dict(
        line.split(":", 1)
        for line in (HERE / "compose.check.yaml").read_text().split()
        if line.startswith("heimdall-check/")
    )
    for target in STANDINS:
        name = f"heimdall-check/{target}"
        began = time.monotonic()
        done = engine.docker(
            "build", "--network=host", "--target", target, "-t", f"{name}:{tags[name]}",
            "--build-arg", f"MLFLOW_VERSION={mlflow.group(1) if mlflow else ''}",
            "--build-arg", f"UV_IMAGE={uv.group(1) if uv else ''}",
            str(HERE / "standins"), check=False, timeout=1200,
        )  # fmt: skip
        if done.returncode != 0:
            raise dc.Skip(f"stand-in image {name} did not build:\n{done.stderr[-2000:]}")
        log(f"stand-in {name}:{tags[name]} built in {time.monotonic() - began:.0f} s")


class Stack:
    """docker-compose (v1, Debian's) on compose.yaml + compose.check.yaml."""

    def __init__(self, engine: dc.Engine) -> None:
        """Remember the engine."""
        self.engine = engine

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> Any:
        """Run docker-compose in the repository.

        Debian's docker-compose 1.29 rejects the Compose spec's top-level ``name:``, so it
        reads a copy of compose.yaml without that line (``-p`` names the project instead).
        """
        copy = self.engine.tmp / "compose.yaml"
        if not copy.exists():
            text = (dc.ROOT / "compose.yaml").read_text()
            copy.write_text(re.sub(r"^name: .*\n", "", text, count=1, flags=re.M))
        cmd = [COMPOSE, "-p", PROJECT, "--project-directory", str(dc.ROOT), "-f", str(copy),
               "-f", str(HERE / "compose.check.yaml"), *args]  # fmt: skip
        return dc.run(cmd, env=self.engine.env, check=check, timeout=timeout)

    def containers(self, service: str) -> list[str]:
        """Names of the service's running containers."""
        out = self.engine.docker(
            "ps", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
            "--format", "{{.Names}}",
        ).stdout  # fmt: skip
        return sorted(out.split())

    def models_of(self, container: str) -> dict[str, Any]:
        """/v1/models of one replica, read from inside its container."""
        done = self.engine.docker(
            "exec", container, "python", "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8000/v1/models', timeout=5).read().decode())",
            check=False, timeout=30,
        )  # fmt: skip
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def diagnose(self) -> str:
        """Logs of the replicas and the LB, and the replicas' health probe results."""
        parts = [self.compose("logs", "--no-color", "--tail", "30", "heimdall", "lb", "bootstrap",
                              check=False).stdout]  # fmt: skip
        for name in self.containers("heimdall"):
            health = self.engine.docker("inspect", "-f", "{{json .State.Health}}", name,
                                        check=False).stdout  # fmt: skip
            parts.append(f"{name} health: {health[-1500:]}")
        return "\n".join(parts)

    def operator(self, *args: str) -> str:
        """A heimdall-inference operator verb in a one-off container on the stack's network."""
        done = self.compose(
            "run", "--rm", "--no-deps", "-T", "-e", "REDIS_URL=redis://redis:6379/0",
            "-e", "MLFLOW_TRACKING_URI=http://mlflow:5000", "bootstrap", *args, timeout=300,
        )  # fmt: skip
        return str(done.stdout)


class Load:
    """Predictions through the load balancer from a few threads until stopped."""

    def __init__(self, threads: int = 3) -> None:
        """Start sending."""
        # Every request computed (no prediction cache), so each one crosses the swap.
        self.body = json.loads((dc.ROOT / "examples/request.json").read_bytes())
        self.body["cache"] = False
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._loop, i) for i in range(threads)]

    def _loop(self, worker: int) -> None:
        n = 0
        while not self.stop_event.is_set():
            body = json.dumps({**self.body, "request_id": f"load-{worker}-{n}"}).encode()
            status, reply = dc.http(LB + "/v1/predict", body, timeout=30)
            version = json.loads(reply)["model"]["version"] if status == 200 else "-"
            with self.lock:
                self.statuses[status] += 1
                self.versions[version] += 1
            n += 1
            time.sleep(0.02)

    def stop(self) -> tuple[Counter[int], Counter[str]]:
        """Stop and return (statuses, versions answered)."""
        self.stop_event.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return self.statuses, self.versions


def bring_up(stack: Stack) -> list[str]:
    """docker-compose up with two replicas; the LB answers the README example."""
    began = time.monotonic()
    up = stack.compose("up", "-d", "--no-build", "--scale", "heimdall=2", check=False,
                       timeout=900)  # fmt: skip
    if up.returncode != 0:
        raise dc.Failure(f"docker-compose up failed: {up.stderr[-2000:]}\n{stack.diagnose()}")
    if dc.wait_status(LB + "/health/ready", 200, 180) is None:
        raise dc.Failure(f"the load balancer never answered /health/ready\n{stack.diagnose()}")
    seconds = time.monotonic() - began
    replicas = stack.containers("heimdall")
    boot = stack.compose("ps", "bootstrap").stdout
    if len(replicas) != 2 or "Exit 0" not in boot:
        raise dc.Failure(f"replicas {replicas}, bootstrap: {boot}")
    answer = dc.predict_example(LB)
    dc.summary(
        f"compose: stack up in {seconds:.0f} s (redis, mlflow server, bootstrap exited 0, "
        f"2 replicas, nginx, prometheus, otel sink); through the LB: "
        f"{dc.check_answer(answer, 'through the load balancer')}"
    )
    return replicas


def check_prometheus() -> None:
    """Prometheus finds both replicas through Docker's DNS and scrapes them."""
    deadline, up_targets = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        status, body = dc.http("http://127.0.0.1:9090/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        up_targets = [
            t["labels"]["instance"]
            for t in targets
            if t["labels"]["job"] == "heimdall" and t["health"] == "up"
        ]
        if len(up_targets) == 2:
            break
        time.sleep(2)
    if len(up_targets) != 2:
        raise dc.Failure(f"Prometheus scrapes {up_targets} of job heimdall, not 2 replicas")
    dc.summary(f"prometheus: job heimdall has 2 targets up ({', '.join(sorted(up_targets))})")


def check_rollout(stack: Stack, replicas: list[str]) -> None:
    """A second version promoted while load runs through the LB: both converge, none fails."""
    stack.operator("sh", "-c", f'python -c "{MAKE_V2}" && heimdall-inference bootstrap '
                   "--package /tmp/v2 --alias candidate")  # fmt: skip
    load = Load()
    time.sleep(3)
    promoted_at = time.monotonic()
    dc.log(stack.operator("heimdall-inference", "promote", "2").strip())
    converged: float | None = None
    while time.monotonic() - promoted_at < 120:
        weights = [stack.models_of(c).get("routing", {}).get("weights") for c in replicas]
        if all(w == {"2": 1.0} for w in weights):
            converged = time.monotonic() - promoted_at
            break
        time.sleep(0.5)
    time.sleep(5)  # keep the load on the new version for a while
    statuses, versions = load.stop()
    if converged is None:
        raise dc.Failure(f"replicas did not converge on version 2: {weights}")
    fleet = stack.operator("heimdall-inference", "status")
    failed = sum(n for s, n in statuses.items() if s != 200)
    dc.summary(
        f"rollout: `promote 2` reached both replicas in {converged:.1f} s under load through "
        f"the LB: {sum(statuses.values())} requests (uncached), {failed} failed "
        f"(statuses {dict(statuses)}, answered by version {dict(versions)})"
    )
    dc.log("fleet after the rollout:\n" + fleet)
    if failed:
        raise dc.Failure(f"{failed} requests failed during the rollout: {dict(statuses)}")


def check_redis_restart(stack: Stack, replicas: list[str]) -> None:
    """After Redis lost its data in a restart, ``promote 1`` still reaches both replicas.

    The stack's Redis runs without persistence, so the revision counter and the desired state
    are gone; the LB must then answer with version 1.
    """
    stack.compose("restart", "redis", timeout=120)
    if dc.wait_status(LB + "/health/ready", 200, 60) is None:
        raise dc.Failure(f"not ready after the Redis restart\n{stack.diagnose()}")
    promoted_at = time.monotonic()
    dc.log(stack.operator("heimdall-inference", "promote", "1").strip())
    converged: float | None = None
    while time.monotonic() - promoted_at < 60:
        weights = [stack.models_of(c).get("routing", {}).get("weights") for c in replicas]
        if all(w == {"1": 1.0} for w in weights):
            converged = time.monotonic() - promoted_at
            break
        time.sleep(0.5)
    if converged is None:
        fleet = stack.operator("heimdall-inference", "status")
        raise dc.Failure(f"after a Redis restart, promote 1 did not converge: {weights}\n{fleet}")
    answer = dc.predict_example(LB)
    dc.summary(
        f"redis restarted (data lost), then `promote 1`: both replicas on version 1 in "
        f"{converged:.1f} s; LB answers version {answer['model']['version']}"
    )
    if answer["model"]["version"] != "1":
        raise dc.Failure(f"LB answered version {answer['model']['version']} after promote 1")


def check_stop(stack: Stack, replicas: list[str]) -> None:
    """docker-compose stop: both replicas drain and exit 0 within the grace period."""
    began = time.monotonic()
    stack.compose("stop", "heimdall", timeout=120)
    codes = [
        stack.engine.docker("inspect", "-f", "{{.State.ExitCode}}", c).stdout.strip()
        for c in replicas
    ]
    dc.summary(f"compose stop heimdall: {time.monotonic() - began:.1f} s, exit codes {codes}")
    if codes != ["0", "0"]:
        raise dc.Failure(f"replicas exited {codes} on stop")


def check_compose(engine: dc.Engine) -> int:
    """Bring the stack up, check the LB, Prometheus and a rollout under load, tear it down.

    Returns the number of checks passed (5).
    """
    for port in (8080, 5000, 9090, 4318):
        if dc.http(f"http://127.0.0.1:{port}/", timeout=2)[0] != 0:
            raise dc.Skip(f"host port 127.0.0.1:{port} is taken; compose.yaml publishes it")
    build_standins(engine, dc.log)
    stack = Stack(engine)
    stack.compose("down", "-v", "--remove-orphans", check=False)
    try:
        replicas = bring_up(stack)
        check_prometheus()
        check_rollout(stack, replicas)
        check_redis_restart(stack, replicas)
        check_stop(stack, replicas)
        return 5
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
