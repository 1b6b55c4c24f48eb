"""A raw-socket HTTP/1.1 client for abuse tests: send exactly the bytes given, read what comes."""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass


@dataclass
class Answer:
    """One parsed response."""

    status: int
    headers: dict[str, str]
    body: bytes


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_head(
    method: str, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None
) -> bytes:
    """``METHOD path HTTP/1.1`` with Host and the given headers, ending with the blank line."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in items)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = bytearray()
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def parse(data: bytes) -> tuple[list[Answer], bytes]:
    """The complete responses at the start of ``data`` (Content-Length bodies) and the rest."""
    answers = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        answers.append(Answer(status, headers, rest[:length]))
        data = rest[length:]
    return answers, data


def read_answer(sock: socket.socket, timeout: float = 10.0) -> Answer | None:
    """One response on a connection kept open; None if the server closed without one."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers, _ = parse(data)
        if answers:
            return answers[0]
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            answers, _ = parse(data)
            return answers[0] if answers else None
        data += chunk
    return None


def exchange(port: int, raw: bytes, *, shut_write: bool = False, timeout: float = 10.0) -> bytes:
    """Send ``raw`` on a new connection (then half-close if asked) and read until closed."""
    with connect(port, timeout) as sock:
        sock.sendall(raw)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock, timeout)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (reads and drops any data)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False
