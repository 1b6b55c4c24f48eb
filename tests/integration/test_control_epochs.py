"""Control plane across real replicas: Redis data loss, cross-namespace replay, status.

Each test that kills Redis starts a redis-server of its own (the session's is shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from app.control.protocol import ControlMessage, sign
from tests.integration.test_rollout import cli, served_version, wait_for
from tests.support.mlflow_rest import MlflowRestServer
from tests.support.procs import ROOT, RedisServer, Server, run_cli
from tests.support.variants import register_variant, registry

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "rf-localizer"


def models(server: Server) -> dict:  # type: ignore[type-arg]
    return httpx.get(server.url + "/v1/models", timeout=5).json()


def metric(server: Server, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_replicas_follow_a_new_epoch_after_redis_loses_its_data_and_refuse_a_replay(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    own_redis: RedisServer,
    tmp_path: Path,
) -> None:
    env = {
        **registry_env,
        "REDIS_URL": own_redis.url,
        "HEIMDALL_CONTROL_NAMESPACE": f"e{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_CONTROL_RETRY_MAX_S": "1",
        "HEIMDALL_POOL_WORKERS": "1",
    }
    v2 = register_variant(env, tmp_path, "good", calibration=1.21)
    replicas = [start_server(**env, HEIMDALL_REPLICA_ID=f"replica-{i}") for i in range(2)]
    desired_key = f"{env['HEIMDALL_CONTROL_NAMESPACE']}:{MODEL}:desired"
    for weights in (f"{v2}=1", "1=1", f"{v2}=1"):
        cli(env, "route", weights)
    wait_for(lambda: all(models(s)["control"]["revision"] == 3 for s in replicas), 20.0)
    old_epoch = models(replicas[0])["control"]["epoch"]
    old_doc = redis.Redis.from_url(own_redis.url).get(desired_key)
    assert old_doc is not None and json.loads(old_doc)["epoch"] == old_epoch

    own_redis.stop()  # SIGKILL: no persistence, every key is gone
    own_redis.start()

    def lost_state_flagged() -> bool:
        status = run_cli(env, "status")
        return status.returncode == 1 and "Redis lost its data?" in status.stdout

    wait_for(lost_state_flagged, 15.0)  # once the replicas report again
    out = cli(env, "route", "1=1")  # checks version 1 in the sqlite registry first (MLflow)
    published = time.monotonic()  # the document is in Redis and announced once route returns
    assert "revision 1:" in out, out
    wait_for(
        lambda: all(
            served_version(s) == {"1": 1.0} and models(s)["control"]["revision"] == 1
            for s in replicas
        ),
        10.0,
    )
    took = time.monotonic() - published
    print(f"\nRedis lost its data; 2 replicas applied the new epoch {took:.2f}s after publish")
    assert took <= 5.0
    for server in replicas:
        control = models(server)["control"]
        assert control["connected"] and control["last_error"] is None
        assert control["epoch_changes"] == 1 and control["epoch"] != old_epoch
        assert control["last_epoch_change"]["from"] == {"epoch": old_epoch, "revision": 3}
        assert metric(server, "heimdall_control_epoch_changes_total") == 1
        assert "control epoch changed from " + old_epoch in server.log_path.read_text()
    status = run_cli(env, "status", "--json")
    fleet = json.loads(status.stdout)
    assert status.returncode == 0, status.stdout
    assert [r["epoch_changes"] for r in fleet["replicas"]] == [1, 1]
    assert all(r["in_sync"] for r in fleet["replicas"])

    # A replay of the old epoch's document (revision 3 > the new 1) is refused and counted.
    client = redis.Redis.from_url(own_redis.url)
    client.set(desired_key, old_doc)
    wait_for(lambda: all(models(s)["control"]["rejected_documents"] >= 1 for s in replicas), 5.0)
    time.sleep(2.5)  # another poll: still refused, counted once
    for server in replicas:
        control = models(server)["control"]
        assert served_version(server) == {"1": 1.0}
        assert control["rejected_documents"] == 1
        assert control["last_rejection"]["reason"] == "epoch"
        assert metric(server, "heimdall_control_rejected_total", reason="epoch") == 1
    status = run_cli(env, "status", "--grace", "0")
    assert status.returncode == 1 and "ERROR" in status.stdout and old_epoch in status.stdout
    # Both keys of the old epoch written back (an old snapshot restored): the replicas have
    # left that epoch and refuse it; `--new-epoch` is the deliberate way forward.
    client.set(f"{env['HEIMDALL_CONTROL_NAMESPACE']}:{MODEL}:epoch", old_epoch)
    wait_for(lambda: all(models(s)["control"]["rejected_documents"] == 2 for s in replicas), 5.0)
    for server in replicas:
        assert "was left earlier" in models(server)["control"]["last_rejection"]["detail"]
        assert served_version(server) == {"1": 1.0}
    cli(env, "route", f"{v2}=1", "--new-epoch")
    wait_for(lambda: all(served_version(s) == {v2: 1.0} for s in replicas), 10.0)
    assert all(models(s)["control"]["epoch_changes"] == 2 for s in replicas)
    client.close()


def test_a_document_signed_for_another_namespace_is_refused_and_counted(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    base = {**registry_env, "REDIS_URL": redis_url, "HEIMDALL_POOL_WORKERS": "1"}
    staging = {
        **base,
        "HEIMDALL_CONTROL_NAMESPACE": f"staging{uuid.uuid4().hex[:6]}",
        "HEIMDALL_CONTROL_HMAC_SECRET": "same-secret",
    }
    prod = {
        **staging,
        "HEIMDALL_CONTROL_NAMESPACE": f"prod{uuid.uuid4().hex[:6]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "1",
    }
    v2 = register_variant(base, tmp_path, "good", calibration=1.22)
    server = start_server(**prod)
    cli(prod, "route", "1=1")
    wait_for(lambda: models(server)["control"]["revision"] == 1, 10.0)
    cli(staging, "route", f"{v2}=1")
    client = redis.Redis.from_url(redis_url)
    src = f"{staging['HEIMDALL_CONTROL_NAMESPACE']}:{MODEL}"
    dst = f"{prod['HEIMDALL_CONTROL_NAMESPACE']}:{MODEL}"
    # The whole signed state of staging copied into prod: document, epoch and counter.
    for key in ("desired", "epoch", "revision"):
        client.set(f"{dst}:{key}", client.get(f"{src}:{key}") or b"")
    doc = json.loads(client.get(f"{dst}:desired") or b"{}")
    message = ControlMessage(doc["revision"], doc["epoch"])
    signed = ControlMessage(
        doc["revision"],
        doc["epoch"],
        sign(message, "same-secret", staging["HEIMDALL_CONTROL_NAMESPACE"], MODEL),
    )
    client.publish(f"{dst}:control", msgspec.json.encode(signed))
    wait_for(lambda: models(server)["control"]["rejected_documents"] >= 1, 5.0)
    time.sleep(1.5)
    control = models(server)["control"]
    assert served_version(server) == {"1": 1.0}
    assert control["rejected_documents"] == 1
    assert control["rejected_messages"] >= 1
    assert control["last_rejection"]["reason"] == "hmac"
    assert metric(server, "heimdall_control_rejected_total", source="document", reason="hmac") == 1
    assert metric(server, "heimdall_control_rejected_total", source="message", reason="hmac") >= 1
    status = run_cli(prod, "status", "--json", "--grace", "0")
    fleet = json.loads(status.stdout)
    assert status.returncode == 1
    assert any("HMAC" in e for e in fleet["errors"]), fleet["errors"]
    assert fleet["replicas"][0]["rejected"] >= 2

    # Without the secret, publishing to the signed fleet is refused unless forced.
    unsigned = {k: v for k, v in prod.items() if k != "HEIMDALL_CONTROL_HMAC_SECRET"}
    refused = run_cli(unsigned, "route", f"{v2}=1")
    assert refused.returncode != 0
    assert "refusing to publish an unsigned desired state" in refused.stderr
    assert "HEIMDALL_CONTROL_HMAC_SECRET" in refused.stderr
    # A correctly signed publish in prod applies.
    cli(prod, "route", f"{v2}=1")
    wait_for(lambda: served_version(server) == {v2: 1.0}, 10.0)
    assert run_cli(prod, "status", "--grace", "30").returncode == 0
    client.close()


def test_concurrent_cli_publishers_get_distinct_increasing_revisions(
    registry_env: dict[str, str], redis_url: str
) -> None:
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"c{uuid.uuid4().hex[:8]}",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.ops.cli", "route", f"{i}=1", "--no-check"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 7)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    revisions = sorted(int(out.split("revision ")[1].split(":")[0]) for out in outputs)
    assert revisions == [1, 2, 3, 4, 5, 6], outputs
    status = json.loads(run_cli(env, "status", "--json").stdout)
    assert [h["revision"] for h in status["history"]] == [6, 5, 4, 3, 2, 1]
    assert status["desired"]["revision"] == 6


# (redis-py itself imports opentelemetry for its own instrumentation.)
HEAVY = ("mlflow", "sqlalchemy", "numpy", "onnxruntime", "telemetry", "litestar", "granian")
PROBE = (
    "import sys, time; t0 = time.perf_counter(); from app.ops.cli import main; "
    "rc = main(sys.argv[1:]); wall = time.perf_counter() - t0; "
    f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})); "
    "print('PROBE', rc, heavy, f'{wall:.3f}')"
)


def probe(env: dict[str, str], *args: str) -> tuple[int, list[str], float]:
    """Run a verb in a fresh interpreter: exit code, heavy modules it imported, wall time."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - t0
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE"))
    _, rc, *rest = line.split(" ", 2)
    heavy = json.loads(rest[0].rsplit(" ", 1)[0].replace("'", '"'))
    return int(rc), heavy, wall


def test_operator_verbs_import_nothing_heavy_and_promote_talks_rest(
    registry_env: dict[str, str], redis_url: str
) -> None:
    rest = MlflowRestServer(registry_env["MLFLOW_TRACKING_URI"])
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"f{uuid.uuid4().hex[:8]}",
    }
    remote = {**env, "MLFLOW_TRACKING_URI": rest.url}
    alias = f"fast{uuid.uuid4().hex[:6]}"
    try:
        walls = {}
        for verb, args, verb_env in (
            ("promote (tracking server)", ("promote", "1", "--alias", alias), remote),
            # route checks its versions: over REST against a tracking server (no MLflow).
            ("route (tracking server)", ("route", "1=1"), remote),
            # ... and with sqlite's own tables against a local registry (no MLflow either).
            ("route (sqlite)", ("route", "1=1", f"@{alias}=1"), env),
            ("shadow (sqlite)", ("shadow", "1", "--fraction", "0.1"), env),
            ("status", ("status",), env),
        ):
            rc, heavy, walls[verb] = probe(verb_env, *args)
            assert rc == 0 and heavy == [], (verb, heavy)
        assert rest.calls == [
            "GET /api/2.0/mlflow/model-versions/get",
            "POST /api/2.0/mlflow/registered-models/alias",
            "GET /api/2.0/mlflow/model-versions/get",
        ]
        assert registry(registry_env).resolve(f"@{alias}").version == "1"
        rc, _, walls["promote (sqlite, MLflow)"] = probe(env, "promote", "1", "--alias", alias)
        assert rc == 0
        missing = run_cli(remote, "promote", "999", "--alias", alias)
        assert missing.returncode == 4 and "version=999" in missing.stderr  # 4: not found
    finally:
        rest.stop()
    print(
        "\nwall time per verb (fresh interpreter): "
        + ", ".join(f"{verb} {wall:.2f}s" for verb, wall in walls.items())
    )
