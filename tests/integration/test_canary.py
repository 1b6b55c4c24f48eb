"""Progressive delivery across two real replicas under load: rollback on a breach, or 100 %."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.test_control_epochs import models, run_cli
from tests.integration.test_rollout import Load, cli, served_version, wait_for
from tests.support.procs import ROOT, Server
from tests.support.variants import register_variant, registry

# serial: it measures latency, timing or load (runs alone in `make test`)
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.serial]


def models_aliases(env: dict[str, str]) -> list[str]:
    """The aliases of rf-localizer in the registry of ``env``."""
    return list(registry(env).client.get_registered_model("rf-localizer").aliases)


def fleet_env(registry_env: dict[str, str], redis_url: str, **extra: str) -> dict[str, str]:
    """One replica's env in a control namespace of its own (polls every 2 s, one worker)."""
    return {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"k{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_POOL_WORKERS": "1",
        **extra,
    }


def start_canary(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``heimdall-inference canary ARGS`` in the background, returned once a step runs."""
    state_key = f"{env['HEIMDALL_CONTROL_NAMESPACE']}:rf-localizer:canary"
    canary = subprocess.Popen(
        [sys.executable, "-m", "app.ops.cli", "canary", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        wait_for(lambda: b'"running"' in (client.get(state_key) or b""), 30.0)
    except AssertionError:
        canary.kill()
        canary.communicate(timeout=10)
        raise
    finally:
        client.close()
    return canary


def replica_at_v1(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    folder: Path,
    calibration: float,
) -> tuple[dict[str, str], str, Server]:
    """One replica serving a published version 1, and a good candidate registered: (env,
    candidate version, server)."""
    env = fleet_env(registry_env, redis_url)
    good = register_variant(env, folder, "good", calibration=calibration)
    server = start_server(**env)
    cli(env, "route", "1=1")
    wait_for(lambda: models(server)["control"]["revision"] == 1, 20.0)
    return env, good, server


def errors_by_version(servers: list[Server]) -> Counter[str]:
    """Failed predictions per model version, from every replica's /metrics."""
    out: Counter[str] = Counter()
    for server in servers:
        for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("heimdall_inference_requests_total{") and 'outcome="ok"' not in line:
                version = line.split('model_version="')[1].split('"')[0]
                out[version] += int(float(line.rsplit(" ", 1)[1]))
    return out


def run_under_load(servers: list[Server], action: Callable[[], None]) -> Counter[int]:
    loads = [Load(servers) for _ in range(3)]
    for load in loads:
        load.start()
    time.sleep(1.0)
    try:
        action()
        time.sleep(1.0)
    finally:
        for load in loads:
            load.stop.set()
            load.join()
    return sum((load.codes for load in loads), Counter())


def test_canary_rolls_a_flaky_version_back_and_takes_a_good_one_to_100_percent(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Reports (with figures) every second.
    env = fleet_env(registry_env, redis_url, HEIMDALL_CONTROL_HEARTBEAT_TTL_S="3")
    flaky = register_variant(env, tmp_path, "flaky", calibration=1.26)
    good = register_variant(env, tmp_path, "good", calibration=1.27)
    servers = [start_server(**env, HEIMDALL_REPLICA_ID=f"replica-{i}") for i in range(2)]
    cli(env, "route", "1=1")
    wait_for(lambda: all(models(s)["control"]["revision"] == 1 for s in servers), 20.0)
    # The p99 gate is loose here: a 2-core machine shared with other jobs is noisy, and this
    # test is about the error gate and the mechanics (steps, leader, rollback, history).
    gates = ("--interval", "4s", "--min-requests", "15", "--max-p99-ratio", "20")
    outcome: dict[str, object] = {}

    def canary_flaky() -> None:
        outcome["flaky"] = run_cli(env, "canary", flaky, "--steps", "20,50,100", *gates)
        wait_for(lambda: all(served_version(s) == {"1": 1.0} for s in servers), 10.0)

    codes = run_under_load(servers, canary_flaky)
    done = outcome["flaky"]
    print(f"\ncanary of the flaky version {flaky}:\n{done.stdout}")  # type: ignore[attr-defined]
    assert done.returncode == 1, done.stderr  # type: ignore[attr-defined]
    assert "rolled back at 20%: error rate" in done.stdout  # type: ignore[attr-defined]
    failed = sum(n for code, n in codes.items() if code != 200)
    errors = errors_by_version(servers)
    print(f"requests {sum(codes.values())}, failed {failed}, errors by version {dict(errors)}")
    assert failed > 0 and errors[flaky] == failed  # every failure is the candidate's share
    assert errors["1"] == 0  # 0 failed requests outside the canary share

    # By alias: compared as the version it points at (as "@staging…" its traffic counted as
    # the baseline's and the canary always rolled back for too little traffic).
    alias = f"staging{uuid.uuid4().hex[:6]}"  # the session's registry: a name of its own
    registry(env).set_alias("rf-localizer", alias, good)

    def canary_good() -> None:
        outcome["good"] = run_cli(env, "canary", f"@{alias}", "--steps", "20,50,100", *gates)

    codes = run_under_load(servers, canary_good)
    done = outcome["good"]
    print(f"canary of the good version {good}:\n{done.stdout}")  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stdout + done.stderr  # type: ignore[attr-defined]
    assert set(codes) == {200}, codes
    wait_for(lambda: all(served_version(s) == {good: 1.0} for s in servers), 10.0)
    status = run_cli(env, "status")
    print(status.stdout)
    assert status.returncode == 0
    assert f"canary {good}: complete at 100%" in status.stdout
    assert f"canary {flaky} rolled back at 20%" in status.stdout  # in the history
    for step in ("20%", "50%", "100%"):
        assert f"canary {good} step {step}" in status.stdout
    assert (
        redis.Redis.from_url(redis_url).get(
            f"{env['HEIMDALL_CONTROL_NAMESPACE']}:rf-localizer:canary:lock"
        )
        is None
    )


def test_a_second_leader_is_refused_while_a_canary_runs(
    registry_env: dict[str, str], redis_url: str
) -> None:
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"l{uuid.uuid4().hex[:8]}",
    }
    cli(env, "route", "1=1")
    lock = f"{env['HEIMDALL_CONTROL_NAMESPACE']}:rf-localizer:canary:lock"
    client = redis.Redis.from_url(redis_url)
    client.set(lock, "someone@else:1234", px=120_000)  # (outlives every check below)
    refused = run_cli(env, "canary", "2", "--interval", "1s", "--no-check")
    assert refused.returncode == 1 and "another canary is running" in refused.stderr
    assert "someone@else" in refused.stderr
    # Other publishers too: the canary's next step would undo their change.
    for verb in (("route", "1=1"), ("shadow", "1"), ("promote", "1", "--alias", "held")):
        refused = run_cli(env, *verb)
        assert refused.returncode == 1 and "a canary is running" in refused.stderr, refused
    assert "held" not in models_aliases(registry_env)  # promote refused before the alias
    client.delete(lock)
    client.close()


def test_a_canary_the_fleet_cannot_apply_is_rolled_back(
    start_server: Callable[..., Server], registry_env: dict[str, str], redis_url: str
) -> None:
    env = fleet_env(registry_env, redis_url)
    server = start_server(**env)
    cli(env, "route", "1=1")
    wait_for(lambda: models(server)["control"]["revision"] == 1, 20.0)
    # The version already serving everything has no baseline to be compared with (it passed,
    # comparing nothing); by number or by an alias that points at it.
    for ref in ("1", "@production"):
        same = run_cli(env, "canary", ref, "--steps", "50,100", "--interval", "1s")
        assert same.returncode == 1 and "already takes all the traffic" in same.stderr, same
    done = run_cli(
        env, "canary", "999", "--steps", "50,100", "--interval", "1s", "--no-check"
    )  # a version the fleet cannot apply; without --no-check canary refuses it up front
    print(f"\n{done.stdout}")
    assert done.returncode == 1, done.stderr
    assert "rolled back at 50%: replica " in done.stdout
    assert "failed to apply revision 2: " in done.stdout
    wait_for(lambda: models(server)["control"]["revision"] == 3, 10.0)
    assert served_version(server) == {"1": 1.0}


def test_a_forced_change_during_a_canary_is_left_in_place_and_stops_it(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """An operator who publishes with --force during a canary keeps their state: the canary
    stops (exit 1) instead of publishing its next step or its rollback over it (each step
    was published from the pre-canary state, silently undoing the operator's change)."""
    env, good, server = replica_at_v1(start_server, registry_env, redis_url, tmp_path, 1.28)
    canary = start_canary(env, good, "--steps", "50,100", "--interval", "5s")
    try:
        assert run_cli(env, "route", "1=1").returncode == 1  # refused while it runs
        cli(env, "shadow", good, "--fraction", "0.5", "--force")
        out, err = canary.communicate(timeout=90)
    finally:
        canary.kill()
    print(f"\n{out}")
    assert canary.returncode == 1, err
    assert "stopped: the desired state changed under the canary" in out
    wait_for(lambda: models(server)["routing"]["shadow"] == good, 20.0)
    assert served_version(server) == {"1": 0.5, good: 0.5}  # the step the operator saw


def test_a_canary_stopped_by_sigterm_rolls_back_and_one_killed_shows_as_abandoned(
    start_server: Callable[..., Server], registry_env: dict[str, str], redis_url: str
) -> None:
    """SIGTERM (a timeout, systemd, CI) rolls the canary back before it exits; a leader killed
    outright leaves its state "running" until the lock expires, then it reads "abandoned"
    (the split stayed, status said "running at 50%" forever, operators were refused)."""
    env = fleet_env(registry_env, redis_url)
    server = start_server(**env)
    cli(env, "route", "1=1")
    wait_for(lambda: models(server)["control"]["revision"] == 1, 20.0)
    lock_key = f"{env['HEIMDALL_CONTROL_NAMESPACE']}:rf-localizer:canary:lock"
    client = redis.Redis.from_url(redis_url)
    args = ("2", "--steps", "50,100", "--interval", "20s", "--no-check")
    canary = start_canary(env, *args)
    try:
        canary.send_signal(signal.SIGTERM)
        out, err = canary.communicate(timeout=60)
        assert canary.returncode == 1 and "canary interrupted" in err, (out, err)
        assert "rolled back at 50%: interrupted" in run_cli(env, "status").stdout
        assert client.get(lock_key) is None  # released: operators are not refused
        wait_for(lambda: served_version(server) == {"1": 1.0}, 20.0)

        canary = start_canary(env, *args)
        canary.kill()
        canary.communicate(timeout=10)
        client.delete(lock_key)  # what its TTL does 30 s + interval / 4 after the last renewal
        status = run_cli(env, "status").stdout
        assert "canary 2: abandoned at 50% (its leader is gone" in status, status
        cli(env, "route", "1=1")  # not refused
    finally:
        canary.kill()
        canary.communicate(timeout=10)
        client.close()


def test_a_canary_whose_redis_lost_its_data_puts_the_pre_canary_state_back(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Redis emptied during the 50 % step (restarted without its data): the rollback found
    no document and stopped "left as it is", the replicas kept the split, and the canary
    said only "Connection closed" (third outside review). With no document nobody else's
    state is there: the pre-canary state is published again, in a new epoch."""
    env, good, server = replica_at_v1(start_server, registry_env, redis_url, tmp_path, 1.31)
    canary = start_canary(env, good, "--steps", "50,100", "--interval", "8s")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: good in served_version(server), 20.0)  # the 50 % step applied
        for key in client.scan_iter(f"{env['HEIMDALL_CONTROL_NAMESPACE']}:*"):
            client.delete(key)
        out, err = canary.communicate(timeout=60)
        assert canary.returncode != 0, (out, err)
        assert "rolled back at 50%" in out, (out, err)
        wait_for(lambda: served_version(server) == {"1": 1.0}, 20.0)
    finally:
        canary.kill()
        canary.communicate(timeout=10)
        client.close()


def test_a_forced_change_in_the_last_step_is_not_reported_complete(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Under traffic, an operator's --force during the 100 % step: the canary says "stopped"
    (exit 1), not "complete" over a state it no longer owns (it judged the window and
    passed)."""
    env = fleet_env(registry_env, redis_url, HEIMDALL_CONTROL_HEARTBEAT_TTL_S="3")
    good = register_variant(env, tmp_path, "good", calibration=1.29)
    server = start_server(**env)
    cli(env, "route", "1=1")
    wait_for(lambda: models(server)["control"]["revision"] == 1, 20.0)
    args = [good, "--steps", "100", "--interval", "4s", "--min-requests", "5"]
    args += ["--max-p99-ratio", "1000"]
    done: dict[str, tuple[int, str]] = {}

    def forced_during_the_last_step() -> None:
        canary = start_canary(env, *args)
        cli(env, "shadow", "1", "--fraction", "0.2", "--force")
        out, err = canary.communicate(timeout=90)
        done["canary"] = (canary.returncode, out + err)

    run_under_load([server], forced_during_the_last_step)
    code, text = done["canary"]
    print(f"\n{text}")
    assert code == 1 and "stopped: the desired state changed under the canary" in text
    assert "complete" not in text
