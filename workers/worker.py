"""The worker process: owns ONNX Runtime sessions and does features, inference and decoding.

A receive thread drains the pipe continuously (so the parent never blocks on a busy worker)
and answers pings itself, reporting how long the compute thread has been busy; the main
thread processes messages one at a time. The worker ignores SIGINT/SIGTERM: the parent
orders shutdown with a Stop message and, past a timeout, kills it.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from telemetry.logs import configure_logging, job_trace
from workers.errors import NonFiniteOutput, ServiceError
from workers.gcfreeze import freeze_startup_objects
from workers.messages import (
    Ack,
    Hang,
    Hello,
    Infer,
    InferReply,
    ItemError,
    Load,
    Ping,
    Pong,
    Predict,
    PredictReply,
    Stop,
    TestRequest,
    Timings,
    Unload,
    request_decoder,
    test_request_decoder,
)
from workers.runtime import LoadedModel
from workers.shm import open_view
from workers.spec import sha256_file

log = logging.getLogger("heimdall.worker")


class WorkerConfig(msgspec.Struct, frozen=True):
    """What a worker needs to start (sent as MessagePack, not pickled)."""

    worker_id: int
    intra_op_threads: int = 1
    test_hooks: bool = False
    log_level: str = "INFO"
    arena_path: str = ""
    log_format: Literal["json", "text", "auto"] = "auto"
    replica: str = ""


class Worker:
    """Message loop of one worker process."""

    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        """Keep the pipe and configuration; nothing is loaded until a Load message."""
        self.conn = conn
        self.config = config
        self.models: dict[str, LoadedModel] = {}
        self.inbox: queue.SimpleQueue[TestRequest | None] = queue.SimpleQueue()
        # Test-only messages are undecodable unless the worker was started with test hooks.
        self.decoder = test_request_decoder if config.test_hooks else request_decoder
        self.busy_since = 0.0
        self.send_lock = threading.Lock()
        self.encoder = msgspec.msgpack.Encoder()
        self.arena = open_view(config.arena_path) if config.arena_path else None

    def send(self, reply: msgspec.Struct) -> None:
        """Send one reply; the lock keeps pongs and results from interleaving."""
        data = self.encoder.encode(reply)
        with self.send_lock:
            self.conn.send_bytes(data)

    def receive_loop(self) -> None:
        """Drain the pipe into the inbox; answer pings directly."""
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.inbox.put(None)  # parent gone: exit
                return
            try:
                message: TestRequest = self.decoder.decode(data)
            except msgspec.DecodeError:
                log.error("worker %d: undecodable message dropped", self.config.worker_id)
                continue
            if isinstance(message, Ping):
                busy = time.monotonic() - self.busy_since if self.busy_since else 0.0
                self.send(Pong(message.id, busy))
            else:
                self.inbox.put(message)

    def serve(self) -> None:
        """Process messages until Stop or the parent disappears."""
        threading.Thread(target=self.receive_loop, name="receive", daemon=True).start()
        self.send(Hello(os.getpid()))
        while True:
            message = self.inbox.get()
            if message is None or isinstance(message, Stop):
                return
            self.busy_since = time.monotonic()
            try:
                self.handle(message)
            finally:
                self.busy_since = 0.0

    def handle(self, message: TestRequest) -> None:
        """Act on one message and reply."""
        if isinstance(message, Predict):
            model = self.models.get(message.version)
            if model is None:
                error = ItemError("not_ready", f"version {message.version} is not loaded")
                self.send(PredictReply(message.id, [error] * len(message.items), Timings()))
                return
            started = time.perf_counter()
            reply = self.predict(model, message, self.arena)
            self.send(reply)
            if log.isEnabledFor(logging.DEBUG):
                self._log_jobs(message, time.perf_counter() - started)
        elif isinstance(message, Infer):
            with job_trace(message.trace):
                started = time.perf_counter()
                self.send(self.infer(message))
                log.debug(
                    "worker %d inferred a batch of %d on version %s in %.2f ms",
                    self.config.worker_id,
                    message.batch,
                    message.version,
                    (time.perf_counter() - started) * 1e3,
                )
        elif isinstance(message, Load):
            self.load(message)
        elif isinstance(message, Unload):
            self.models.pop(message.version, None)
            self.send(Ack(message.id, True))
        elif isinstance(message, Hang):  # decoded only with test hooks (see __init__)
            time.sleep(message.seconds)
            self.send(Ack(message.id, True))

    def _log_jobs(self, message: Predict, seconds: float) -> None:
        """One debug line per request in ``message``, under that request's trace."""
        counts: dict[str, int] = {}
        for token in message.traces or [""] * len(message.items):
            counts[token] = counts.get(token, 0) + 1
        for token, items in counts.items():
            with job_trace(token):
                log.debug(
                    "worker %d predicted %d of %d items on version %s in %.2f ms",
                    self.config.worker_id,
                    items,
                    len(message.items),
                    message.version,
                    seconds * 1e3,
                )

    @staticmethod
    def predict(model: LoadedModel, message: Predict, arena: mmap.mmap | None) -> PredictReply:
        """Compute the items whose deadline has not passed; the others are not computed."""
        now = time.time_ns()
        late = [
            bool(message.deadlines_ns) and message.deadlines_ns[i] < now
            for i in range(len(message.items))
        ]
        if not any(late):
            results, timings = model.predict(message.items, arena, message.traces)
            return PredictReply(message.id, results, timings)
        expired = ItemError(
            "deadline",
            "the request's deadline passed while it waited for a worker; it was not computed",
        )
        live = [item for item, gone in zip(message.items, late, strict=True) if not gone]
        traces = [t for t, gone in zip(message.traces, late, strict=False) if not gone]
        computed, timings = model.predict(live, arena, traces) if live else ([], Timings())
        it = iter(computed)
        merged = [expired if gone else next(it) for gone in late]
        return PredictReply(message.id, merged, timings)

    def load(self, message: Load) -> None:
        """Build, warm up and validate a session; keep the old one until told to unload."""
        if message.sha256 and sha256_file(Path(message.model_path)) != message.sha256:
            self.send(
                Ack(
                    message.id,
                    False,
                    "model_load",
                    f"{message.model_path} changed on disk since it was verified "
                    "(sha256 mismatch); refusing to load it",
                )
            )
            return
        try:
            model = LoadedModel(
                message.model_path,
                message.spec,
                self.config.intra_op_threads,
                message.label,
            )
        except ServiceError as exc:
            self.send(Ack(message.id, False, exc.code, exc.detail))
            return
        except Exception as exc:  # any other loader failure must not kill the worker
            self.send(Ack(message.id, False, "model_load", f"{type(exc).__name__}: {exc}"))
            return
        self.models[message.version] = model
        self.send(Ack(message.id, True))
        freeze_startup_objects("pool worker")

    def infer(self, message: Infer) -> InferReply:
        """Run ready-made tensors through a session (no preprocessing)."""
        model = self.models.get(message.version)
        if model is None:
            return InferReply(
                message.id, error=ItemError("not_ready", f"{message.version} not loaded")
            )
        cap, feat = model.spec.capture, model.spec.features
        shape = (message.batch, cap.max_receivers)
        try:
            features = np.frombuffer(message.features, "<f4").reshape(
                *shape, feat.n_frames, feat.n_bands
            )
            receivers = np.frombuffer(message.receivers, "<f4").reshape(*shape, 2)
            mask = np.frombuffer(message.mask, "<f4").reshape(shape)
        except ValueError as exc:
            return InferReply(message.id, error=ItemError("invalid_input", str(exc)))
        t0 = time.time_ns()
        mean, sigma, rho = model.run(features, receivers, mask)
        t1 = time.time_ns()
        for role, values in (("mean", mean), ("sigma", sigma), ("rho", rho)):
            finite = np.isfinite(values.reshape(message.batch, -1)).all(axis=1)
            if not finite.all():
                item = int(np.argmin(finite))
                return InferReply(
                    message.id,
                    error=ItemError(
                        NonFiniteOutput.code,
                        f"output {model.spec.outputs[role].name!r} is not finite for item "
                        f"{item} of the batch ({int((~finite).sum())} of {message.batch} items); "
                        "its input tensors are outside what the model can compute",
                    ),
                )
        return InferReply(
            message.id,
            mean.astype("<f4").tobytes(),
            sigma.astype("<f4").tobytes(),
            rho.astype("<f4").tobytes(),
            timings=Timings(t0, t0, t0, t1),
        )


def worker_main(conn: Connection, config_raw: bytes) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.msgpack.decode(config_raw, type=WorkerConfig)
    configure_logging(config.log_level, config.log_format, config.replica)
    Worker(conn, config).serve()
