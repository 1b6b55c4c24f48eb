"""The IPC message unions: test-only messages stay out of production decoding."""

from __future__ import annotations

import multiprocessing as mp
import threading

import msgspec
import pytest

from workers.messages import (
    Ack,
    Hang,
    Unload,
    reply_decoder,
    request_decoder,
    request_encoder,
    test_request_decoder,
)
from workers.worker import Worker, WorkerConfig

HANG = request_encoder.encode(Hang(1, 0.0))


def test_production_decoding_rejects_the_hang_test_hook() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'hang'"):
        request_decoder.decode(HANG)
    assert test_request_decoder.decode(HANG) == Hang(1, 0.0)


def replies_to_hang_then_unload(test_hooks: bool) -> list[object]:
    """Run a real worker loop on a pipe, send Hang then Unload, collect replies to both."""
    parent, child = mp.Pipe(duplex=True)
    worker = Worker(child, WorkerConfig(worker_id=0, test_hooks=test_hooks))
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        assert parent.poll(10.0)
        reply_decoder.decode(parent.recv_bytes())  # Hello
        parent.send_bytes(HANG)
        parent.send_bytes(request_encoder.encode(Unload(2, "v")))
        replies = []
        while not any(isinstance(r, Ack) and r.id == 2 for r in replies):
            assert parent.poll(10.0), f"no answer to Unload; got {replies}"
            replies.append(reply_decoder.decode(parent.recv_bytes()))
        return replies
    finally:
        parent.close()  # the receive thread sees EOF and the loop ends
        thread.join(10.0)
        child.close()


def test_a_production_worker_drops_the_hang_and_keeps_serving() -> None:
    assert replies_to_hang_then_unload(test_hooks=False) == [Ack(2, True)]


def test_a_worker_started_with_test_hooks_obeys_the_hang() -> None:
    assert replies_to_hang_then_unload(test_hooks=True) == [Ack(1, True), Ack(2, True)]
