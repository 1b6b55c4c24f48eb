"""The RSGI front (app/web/rsgi.py) under real Granian: bodies, answers, lifespan, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import ROOT, free_port


class Granian:
    """``granian --interface rsgi --factory target`` on a free port."""

    def __init__(self, target: str, folder: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "granian.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "rsgi",
                "--factory",
                "--no-ws",
                "--port",
                str(self.port),
                target,
            ],
            cwd=ROOT,
            env={**os.environ, "HEIMDALL_TEST_MARKS": str(folder), **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_up(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                httpx.get(self.url + path, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._out.close()
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Granian]:
    folder = tmp_path_factory.mktemp("rsgi")
    granian = Granian("tests.support.rsgi_target:front", folder)
    granian.wait_up("/items/x")
    yield granian
    granian.stop()


def test_body_in_one_piece_and_streamed_arrives_whole(server: Granian) -> None:
    body = os.urandom(300_000)  # above the 64 kB one-piece limit: streamed
    small = os.urandom(50_000)  # below: one piece
    for payload in (body, small):
        answer = httpx.post(server.url + "/echo?a=1&b=%20", content=payload).json()
        assert answer["length"] == len(payload)
        assert answer["sha256"] == hashlib.sha256(payload).hexdigest()
        assert answer["query"] == "a=1&b=%20"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield small[:1000]
        yield small[1000:]

    answer = httpx.post(server.url + "/echo", content=chunks()).json()
    assert answer["sha256"] == hashlib.sha256(small).hexdigest()


def test_a_stalled_upload_does_not_enter_the_application_until_its_body_is_in(
    server: Granian,
) -> None:
    # A one-piece body is read before the application runs: a client that stalls mid-upload
    # holds the front's small coroutine, not the routing/middleware/handler call stack.
    body = b"z" * 50_000
    head = (f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    before = httpx.get(server.url + "/entered").json()["echo"]
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(head + body[:1000])
        time.sleep(0.5)
        assert httpx.get(server.url + "/entered").json()["echo"] == before
        for sock in socks:
            sock.sendall(body[1000:])
        for sock in socks:
            sock.settimeout(10)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b'"length":50000' in answer
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(server.url + "/entered").json()["echo"] == before + 20


def test_a_direct_route_answers_whole_bodies_and_leaves_the_rest_to_the_application(
    server: Granian,
) -> None:
    url = server.url + "/direct"
    small, large = os.urandom(40_000), os.urandom(200_000)  # under / over the one-piece limit
    direct = httpx.post(url, content=small)
    assert direct.json() == {
        "by": "direct",
        "length": len(small),
        "sha256": hashlib.sha256(small).hexdigest(),
    }
    chunked = httpx.post(url, content=iter([small[:10_000], small[10_000:]]))
    assert chunked.json()["by"] == "app" and chunked.json()["length"] == len(small)
    assert httpx.post(url, content=large).json() == {
        "by": "app",
        "length": len(large),
        "sha256": hashlib.sha256(large).hexdigest(),
    }
    assert httpx.post(url).json()["by"] == "app"  # no body
    assert httpx.get(url).status_code == 405  # another method: the application's answer
    # A direct route that raises: a 500, the upload slot and the body budget given back.
    for _ in range(3):
        assert httpx.post(url, content=small, headers={"x-raise": "1"}).status_code == 500
    assert httpx.post(url, content=small).json()["by"] == "direct"


def test_limits_headers_paths_and_streamed_answers(server: Granian) -> None:
    too_big = httpx.post(server.url + "/echo", content=b"x" * (1024 * 1024 + 1))
    assert too_big.status_code == 413

    def endless() -> Iterator[bytes]:  # chunked and over the limit: Litestar counts and stops
        for _ in range(40):
            yield b"y" * 64 * 1024

    assert httpx.post(server.url + "/echo", content=endless()).status_code == 413

    tagged = httpx.post(
        server.url + "/echo", content=b"{}", headers=[("x-tag", "one"), ("x-tag", "two")]
    ).json()
    assert tagged["x_tag"] == ["one", "two"]
    assert tagged["client"][0] == "127.0.0.1"

    assert httpx.get(server.url + "/items/a%20b").json() == {"name": "a b"}
    assert httpx.get(server.url + "/items/%2541").json() == {"name": "%41"}  # decoded once
    assert httpx.get(server.url + "/items/caf%C3%A9").json() == {"name": "café"}
    assert httpx.get(server.url + "/items/%FF").json() == {"name": "\ufffd"}  # not a 500
    streamed = httpx.get(server.url + "/stream")
    assert streamed.text == "".join(f"part-{i};" for i in range(5))
    assert httpx.get(server.url + "/boom").status_code == 500
    assert httpx.get(server.url + "/items/after-boom").status_code == 200


def test_lifespan_runs_around_serving_and_drains_in_flight(tmp_path: Path) -> None:
    granian = Granian("tests.support.rsgi_target:front", tmp_path)
    granian.wait_up("/items/x")
    assert (tmp_path / "started").exists()
    assert not (tmp_path / "stopped").exists()
    answers: list[int] = []
    slow = threading.Thread(
        target=lambda: answers.append(httpx.get(granian.url + "/slow", timeout=10).status_code)
    )
    slow.start()
    time.sleep(0.3)
    assert granian.stop() == 0
    slow.join(10)
    assert answers == [200]  # the request in flight when SIGTERM came was answered
    assert (tmp_path / "stopped").exists()


def test_startup_failure_stops_the_server(tmp_path: Path) -> None:
    granian = Granian("tests.support.rsgi_target:front", tmp_path, HEIMDALL_TEST_FAIL_STARTUP="1")
    try:
        code = granian.proc.wait(30)
    finally:
        granian.stop()
    assert code != 0
    assert "startup refused on purpose" in granian.log.read_text()


def test_app_that_raises_or_never_answers_gets_500(tmp_path: Path) -> None:
    granian = Granian("tests.support.rsgi_target:raw_front", tmp_path)
    try:
        granian.wait_up("/silent")
        assert httpx.get(granian.url + "/raise").status_code == 500
        assert httpx.get(granian.url + "/silent").status_code == 500
        assert "raw app failure" in granian.log.read_text()
    finally:
        granian.stop()
