"""Settings: validated at start with the variable's name; the README table stays true."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from app.settings import SettingsError, all_env_names, load_settings, settings_table
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
