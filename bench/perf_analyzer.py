"""Triton's perf_analyzer against the service's ``/v2`` endpoints (Open Inference Protocol).

    python -m bench.perf_analyzer [--binary PATH] [--concurrency 1:4:1] [--write]

Starts the usual private stack (bench.service.Stack: sqlite registry, redis-server,
``heimdall-inference serve``), runs perf_analyzer over HTTP (batch 1; it reads the model's
shapes from ``/v2/models/{name}/config``) with simulated captures as input data and prints
its table; ``--write`` puts the table into docs/benchmarks.md.

Getting perf_analyzer (docs/benchmarks.md has the details): the binary ships in the
manylinux ``tritonclient`` wheels up to 2.40 (``tritonclient-2.40.0.data/data/bin/``; newer
wheels and the ``perf-analyzer`` package on PyPI do not carry it). It needs ``libb64.so.0d``
(Debian ``libb64-0d``) and ``libcudart.so.12``; without CUDA a stub exporting the seven
symbols it links (bench/cudart_stub.c) is enough for HTTP runs. Point ``--binary`` (or
``PERF_ANALYZER``) at it and add the stub's folder to ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.service import Stack
from tests.support.procs import ROOT

MODEL = "rf-localizer"
MARK_BEGIN = "<!-- perf_analyzer:start -->"
MARK_END = "<!-- perf_analyzer:end -->"


def find_binary(given: str | None) -> str:
    """perf_analyzer from ``--binary``, ``PERF_ANALYZER`` or PATH."""
    binary = given or os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not binary:
        raise SystemExit("bench.perf_analyzer: no perf_analyzer (see this module's docstring)")
    return binary


def input_data(path: Path, count: int = 16) -> None:
    """perf_analyzer ``--input-data`` JSON: ``count`` simulated captures, packed by the server's
    code (its random inputs can be NaN, which the service refuses with 400)."""
    from tests.support.reference import payload_arrays, reference_spec
    from training.simulate import heard_batch, request_payload
    from workers.inputs import pack_capture

    spec = reference_spec()
    batch = heard_batch(count, 2020)
    entries = []
    for i in range(count):
        packed = pack_capture(*payload_arrays(request_payload(batch, i)), spec)
        entries.append(
            {
                spec.inputs[role].name: {
                    "content": [float(v) for v in array.reshape(-1)],
                    "shape": list(array.shape),
                }
                for role, array in (
                    ("features", packed.features),
                    ("receivers", packed.receivers),
                    ("mask", packed.mask),
                )
            }
        )
    path.write_text(json.dumps({"data": entries}))


def run(binary: str, url: str, concurrency: str, interval_ms: int, data: Path) -> str:
    """One perf_analyzer run; returns its stdout."""
    cmd = [
        binary,
        "-m",
        MODEL,
        "-u",
        url,
        "-i",
        "http",
        "-b",
        "1",
        "--concurrency-range",
        concurrency,
        "--measurement-interval",
        str(interval_ms),
        "--percentile",
        "99",
        "--input-data",
        str(data),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def write(text: str, command: str, version: str) -> None:
    """Replace (or append) the perf_analyzer section of docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"{MARK_BEGIN}\n## Triton perf_analyzer against /v2\n\n"
        f"`{command}` ({stamp}, {version}, 2-core shared machine, 2 workers, batch 1, 16"
        " simulated captures packed by the server's code as `--input-data`, HTTP JSON, p99 as"
        " the reported latency). perf_analyzer reads"
        " `/v2/models/rf-localizer/config` first (it stopped there before that route existed)."
        " What it needed: the binary from the manylinux `tritonclient==2.40.0` wheel"
        " (`tritonclient-2.40.0.data/data/bin/perf_analyzer`; later wheels and PyPI's"
        " `perf-analyzer` 0.1.0 carry none), Debian `libb64-0d` (apt-get, as root) and a"
        " `libcudart.so.12` stand-in built from `bench/cudart_stub.c` (`gcc -shared -fPIC"
        " -Wl,--version-script` giving its seven symbols the `libcudart.so.12` version) on"
        " `LD_LIBRARY_PATH`; details in `bench/perf_analyzer.py`."
        f"\n\n```\n{text.strip()}\n```\n"
        f"{MARK_END}"
    )
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    doc = pattern.sub(lambda _: section, doc) if pattern.search(doc) else doc + "\n" + section
    path.write_text(doc if doc.endswith("\n") else doc + "\n")


def main() -> None:
    """Start the stack, run perf_analyzer, print (and optionally write) its output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=None, help="perf_analyzer executable")
    parser.add_argument(
        "--concurrency", default="1:4:1", help="perf_analyzer start:end:step (1:4:1)"
    )
    parser.add_argument("--interval-ms", type=int, default=5000, help="measurement window")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    binary = find_binary(args.binary)
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    env = {"HEIMDALL_POOL_WORKERS": "2", "HEIMDALL_CACHE_ENABLED": "false"}
    with Stack(env) as stack:
        url = stack.server.url.removeprefix("http://")
        data = stack.folder / "perf_analyzer_input.json"
        input_data(data)
        out = run(binary, url, args.concurrency, args.interval_ms, data)
    print(out)
    if args.write:
        command = f"python -m bench.perf_analyzer --concurrency {args.concurrency} --write"
        write(out, command, version)


if __name__ == "__main__":
    main()
