"""Control-plane replay and on-disk artifact tampering, against real servers.

Unsigned and wrong-key messages: tests/integration/test_rollout.py::
test_hmac_rejects_unsigned_and_wrong_key_messages. A registry tag that lies about the sha256:
test_rollout.py::test_bad_model_keeps_previous_version_serving[bad_sha].
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from app.control.protocol import ControlMessage, sign
from tests.integration.test_rollout import cli, served_version, wait_for
from tests.support.procs import REFERENCE, Server
from tests.support.variants import register_variant
from training.simulate import heard_batch, request_payload
from workers.spec import sha256_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BODY = request_payload(heard_batch(1, 992), 0, cache=False)


def test_replayed_old_signed_revision_has_no_effect(
    start_server: Callable[..., Server],
    registry_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    namespace = f"r{uuid.uuid4().hex[:8]}"
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": namespace,
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "1",
        "HEIMDALL_POOL_WORKERS": "1",
        "HEIMDALL_CONTROL_HMAC_SECRET": "s3cret",
    }
    v2 = register_variant(env, tmp_path, "good", calibration=1.23)
    server = start_server(**env)
    client = redis.Redis.from_url(redis_url)
    desired, channel = f"{namespace}:rf-localizer:desired", f"{namespace}:rf-localizer:control"
    cli(env, "route", "1=1")  # a validly signed old revision an attacker records
    wait_for(lambda: httpx.get(server.url + "/v1/models").json()["routing"]["revision"] >= 1, 10)
    old_doc = client.get(desired)
    cli(env, "route", f"{v2}=1")
    wait_for(lambda: served_version(server) == {v2: 1.0}, 15.0)
    rejected = httpx.get(server.url + "/v1/models").json()["control"]["rejected_messages"]
    # Replay: the old signed document back into the key, and its signed message on the channel.
    client.set(desired, old_doc)
    old = json.loads(old_doc)
    revision, epoch = int(old["revision"]), str(old["epoch"])
    unsigned = ControlMessage(revision, epoch)
    message = ControlMessage(revision, epoch, sign(unsigned, "s3cret", namespace, "rf-localizer"))
    client.publish(channel, msgspec.json.encode(message))
    time.sleep(3.0)  # three polls and the message
    state = httpx.get(server.url + "/v1/models").json()
    assert served_version(server) == {v2: 1.0}
    assert state["control"]["rejected_messages"] > rejected
    assert state["control"]["rejected_documents"] >= 1
    assert state["control"]["last_rejection"]["reason"] in {"stale", "epoch"}
    answer = httpx.post(server.url + "/v1/predict", json=BODY, timeout=10)
    assert answer.json()["model"]["version"] == v2
    client.close()


def test_tampered_cached_artifact_is_detected_and_downloaded_again(
    start_server: Callable[..., Server], registry_env: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "artifacts"
    cached = cache / "rf-localizer" / "1"
    shutil.copytree(REFERENCE, cached)
    model = cached / "model.onnx"
    good = sha256_file(model)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    model.write_bytes(bytes(data))
    assert sha256_file(model) != good
    server = start_server(REDIS_URL="", HEIMDALL_ARTIFACT_CACHE=str(cache))
    assert sha256_file(model) == good, "the tampered file was not replaced"
    answer = httpx.post(server.url + "/v1/predict", json=BODY, timeout=10)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
