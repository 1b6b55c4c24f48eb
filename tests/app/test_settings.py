"""Settings: validated at start with the variable's name; the README table stays true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import SettingsError, all_env_names, load_settings, settings_table
from app.web.processes import HttpProcess
from tests.support.procs import ROOT


def test_defaults_load_and_standard_names_win() -> None:
    settings = load_settings(
        {"MLFLOW_TRACKING_URI": "sqlite:///x.db", "REDIS_URL": "", "HEIMDALL_POOL_WORKERS": "3"}
    )
    assert settings.registry.tracking_uri == "sqlite:///x.db"
    assert settings.cache.redis_url == ""
    assert settings.pool.workers == 3
    assert settings.server.port == 8000


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HEIMDALL_PORT": "eighty"}, "HEIMDALL_PORT"),
        ({"HEIMDALL_POOL_WORKERS": "-1"}, "HEIMDALL_POOL_WORKERS"),
        ({"HEIMDALL_CACHE_TIMEOUT_S": "0"}, "HEIMDALL_CACHE_TIMEOUT_S"),
        ({"HEIMDALL_LOG_LEVEL": "LOUD"}, "HEIMDALL_LOG_LEVEL"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(env)


def test_uploads_must_leave_connections_for_health_checks() -> None:
    env = {"HEIMDALL_MAX_CONCURRENT_UPLOADS": "1000", "HEIMDALL_GRANIAN_BACKPRESSURE": "1100"}
    with pytest.raises(
        SettingsError,
        match=r"HEIMDALL_GRANIAN_BACKPRESSURE .* must be at least "
        r"HEIMDALL_MAX_CONCURRENT_UPLOADS",
    ):
        load_settings(env)
    assert load_settings({**env, "HEIMDALL_GRANIAN_BACKPRESSURE": "1256"})


def test_the_body_budget_must_admit_the_largest_body_the_limits_accept() -> None:
    env = {"HEIMDALL_MAX_BATCH_BODY_BYTES": str(64 << 20)}
    with pytest.raises(
        SettingsError,
        match=r"HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT \(33554432\) must be at least the largest "
        r"body limit \(67108864",
    ):
        load_settings({**env, "HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT": str(32 << 20)})
    assert load_settings({**env, "HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT": str(64 << 20)})


def test_serve_refuses_to_start_on_bad_settings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "serve"],
        cwd=ROOT,
        env={"HEIMDALL_POOL_MAX_BATCH": "0", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "HEIMDALL_POOL_MAX_BATCH" in done.stderr


def test_readme_settings_table_is_generated_from_the_structs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block is not None
    assert block.group(1).strip() == settings_table().strip()
    for name in all_env_names():
        assert f"`{name}`" in readme


def test_http_processes_need_a_pool_worker_each() -> None:
    with pytest.raises(SettingsError, match="HEIMDALL_HTTP_PROCESSES"):
        load_settings({"HEIMDALL_HTTP_PROCESSES": "3", "HEIMDALL_POOL_WORKERS": "2"})
    assert load_settings({"HEIMDALL_HTTP_PROCESSES": "2", "HEIMDALL_POOL_WORKERS": "2"})


def test_pool_workers_are_split_between_http_processes_at_least_one_each() -> None:
    shares = [HttpProcess(i, 2, Path("/x")).pool_share(5) for i in range(2)]
    assert shares == [3, 2]
    assert [HttpProcess(i, 4, Path("/x")).pool_share(2) for i in range(4)] == [1, 1, 1, 1]
    assert HttpProcess(0, 1, None).name("r") == "r"
    assert HttpProcess(1, 2, Path("/x")).name("r") == "r/p1"
