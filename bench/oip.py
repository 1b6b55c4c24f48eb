"""``python -m bench.oip``: the tensor-in path (Open Inference Protocol) against MLServer.

One run, one table (design §9: saturation throughput >= 2.5 x MLServer's on this path):

1. one valid V2 infer body (JSON ``data`` arrays, batch 1) from a simulated capture
   (``training.simulate.iter_batches`` + ``workers.inputs.pack_capture``, reference spec);
2. this service (``bench.service.Stack``: private registry + redis + ``serve``, 2 pool workers):
   check the answer against ONNX Runtime in this process (1e-5), warm up, then k6 ``oip.js``
   closed loop; server CPU per request from psutil over the server's process tree;
3. MLServer with the custom runtime ``bench/mlserver_model.py`` (same session options, 1
   intra-op thread), ``parallel_workers`` = our pool size, same body, same checks and k6 run.

Both servers stay up; ``--rounds`` (default 3) alternating runs, one server loaded at a time,
so a drifting background load hits both alike (the table shows the machine's other CPU).
MLServer is NOT a project dependency: it lives in its own virtualenv outside the repo
(default ``~/.cache/heimdall-bench/mlserver-venv``, ``--venv`` for another), created if
missing with ``pip install mlserver==1.7.1 onnxruntime numpy "uvloop<0.22"`` (uvloop 0.22+
makes 1.7.1's parallel workers die on ``asyncio.get_event_loop()``).
``--write`` appends/replaces the section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench.service import K6_DIR, Stack, run_k6
from tests.support.procs import REFERENCE, ROOT, free_port

DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Tensor-in (Open Inference Protocol) vs MLServer"
MODEL = "rf-localizer"
MLSERVER_VERSION = "1.7.1"
DEFAULT_VENV = Path.home() / ".cache" / "heimdall-bench" / "mlserver-venv"
OUTPUTS = ("mean", "sigma", "rho")
TARGET_RATIO = 2.5


def ensure_venv(venv: Path) -> Path:
    """MLServer's virtualenv (created outside the repo when missing); its ``mlserver``."""
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    print(f"bench.oip: creating {venv} (mlserver=={MLSERVER_VERSION})", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            f"mlserver=={MLSERVER_VERSION}",
            "onnxruntime",
            "numpy",
            "uvloop<0.22",
        ],
        check=True,
    )
    return exe


def tensors() -> dict[str, np.ndarray]:
    """Batch-1 model inputs of one simulated capture, packed by the serving code."""
    from tests.support.reference import payload_arrays, reference_spec
    from training.simulate import heard_batch, request_payload
    from workers.inputs import pack_capture

    spec = reference_spec()
    batch = heard_batch(1, 3003)
    packed = pack_capture(*payload_arrays(request_payload(batch, 0)), spec)
    return {
        spec.inputs["features"].name: packed.features[None].astype(np.float32),
        spec.inputs["receivers"].name: packed.receivers[None].astype(np.float32),
        spec.inputs["mask"].name: packed.mask[None].astype(np.float32),
    }


def expected(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs through ONNX Runtime in this process (the workers' session options)."""
    import onnxruntime as ort

    from workers.runtime import session_options

    session = ort.InferenceSession(
        str(REFERENCE / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"]
    )
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds), strict=True))


def body_of(feeds: dict[str, np.ndarray]) -> str:
    """The JSON V2 infer body (flat ``data``), identical for both servers."""
    inputs = [
        {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        for n, a in feeds.items()
    ]
    return json.dumps({"inputs": inputs}, separators=(",", ":"))


def check_answer(url: str, body: str, want: dict[str, np.ndarray]) -> float:
    """POST once; every output must match in-process ORT to 1e-5. Returns the max |diff|."""
    r = httpx.post(
        f"{url}/v2/models/{MODEL}/infer",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    r.raise_for_status()
    got = {o["name"]: np.asarray(o["data"], dtype=np.float64) for o in r.json()["outputs"]}
    worst = 0.0
    for name, ref in want.items():
        diff = np.abs(got[name].reshape(-1) - ref.astype(np.float64).reshape(-1))
        worst = max(worst, float(diff.max()))
    if worst > 1e-5:
        raise SystemExit(f"bench.oip: {url} disagrees with in-process ORT by {worst:g}")
    return worst


def tree_cpu(root_pid: int, procs: dict[int, psutil.Process]) -> dict[int, float]:
    """pid -> CPU seconds (user + system) of the tree under ``root_pid``."""
    root = psutil.Process(root_pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        p = procs.setdefault(p.pid, p)
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def k6(
    k6_bin: str, url: str, root_pid: int, body_path: Path, vus: int, seconds: float, export: Path
) -> dict[str, Any]:
    """``k6 run oip.js`` closed loop; the server tree's CPU seconds and k6's over the run."""
    procs: dict[int, psutil.Process] = {}
    cmd = [
        k6_bin,
        "run",
        "--quiet",
        "--no-color",
        "--summary-export",
        str(export),
        "-e",
        f"BASE_URL={url}",
        "-e",
        f"BODY={body_path}",
        "-e",
        f"MODEL={MODEL}",
        "-e",
        f"VUS={vus}",
        "-e",
        f"DURATION={seconds:g}s",
        str(K6_DIR / "oip.js"),
    ]
    before = tree_cpu(root_pid, procs)
    sys0 = psutil.cpu_times()
    done, k6_cpu, wall = run_k6(cmd)
    after = tree_cpu(root_pid, procs)
    sys1 = psutil.cpu_times()
    metrics = json.loads(export.read_text())["metrics"] if export.exists() else {}
    busy = sum(
        getattr(sys1, f) - getattr(sys0, f)
        for f in ("user", "system", "nice", "irq", "softirq", "steal")
    )
    n = float(metrics.get("http_reqs", {}).get("count", 0))
    dur = metrics.get("http_req_duration", {})
    server_cpu = sum(c - before.get(pid, 0.0) for pid, c in after.items())
    return {
        "exit": done.returncode,
        "out": done.stdout + done.stderr,
        "requests": n,
        "rps": n / seconds,
        "cpu_s": server_cpu,
        "k6_cpu_s": k6_cpu,
        "failed": float(metrics.get("http_req_failed", {}).get("value", float("nan"))),
        "p50": float(dur.get("med", float("nan"))),
        "p99": float(dur.get("p(99)", float("nan"))),
        "processes": len(after),
        "load1": os.getloadavg()[0],
        "other_cpu_s": busy - server_cpu - k6_cpu,
        "busy_cores": busy / wall,
        "busy_cpu_s": busy,
    }


def measure(
    k6_bin: str,
    url: str,
    root_pid: int,
    body_path: Path,
    vus: int,
    seconds: float,
    folder: Path,
    tag: str,
) -> dict[str, Any]:
    """Warm-up (4 VUs, 3 s), then the measured closed loop."""
    k6(k6_bin, url, root_pid, body_path, 4, 3, folder / f"{tag}-warm.json")
    run = k6(k6_bin, url, root_pid, body_path, vus, seconds, folder / f"{tag}.json")
    if run["exit"] not in (0, 99) or not run["requests"]:
        raise SystemExit(f"bench.oip: k6 against {tag} failed:\n{run['out']}")
    print(
        f"bench.oip: {tag}: {run['rps']:.0f} req/s, "
        f"{run['cpu_s'] * 1e3 / run['requests']:.3f} CPU ms/request, "
        f"p50 {run['p50']:.1f} ms, failed rate {run['failed']:.3f}",
        flush=True,
    )
    return run


def combine(runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Totals over rounds (throughput = all requests / all measured seconds)."""
    n = sum(r["requests"] for r in runs)
    wall = sum(r["busy_cores"] and r["busy_cpu_s"] / r["busy_cores"] for r in runs)
    return {
        "requests": n,
        "rps": n / (seconds * len(runs)),
        "cpu_s": sum(r["cpu_s"] for r in runs),
        "k6_cpu_s": sum(r["k6_cpu_s"] for r in runs),
        "other_cpu_s": sum(r["other_cpu_s"] for r in runs),
        "busy_cores": sum(r["busy_cpu_s"] for r in runs) / wall,
        "failed": max(r["failed"] for r in runs),
        "p50": float(np.median([r["p50"] for r in runs])),
        "p99": max(r["p99"] for r in runs),
        "processes": max(r["processes"] for r in runs),
    }


class MLServer:
    """``mlserver start`` in its own venv on free ports, the custom runtime, N workers."""

    def __init__(self, exe: Path, folder: Path, workers: int) -> None:
        """Write settings.json and the model folder."""
        self.exe, self.folder = exe, folder
        self.port = free_port()
        (folder / "settings.json").write_text(
            json.dumps(
                {
                    "http_port": self.port,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    "parallel_workers": workers,
                    "debug": False,
                    "load_models_at_startup": True,
                }
            )
        )
        model_dir = folder / MODEL
        model_dir.mkdir()
        shutil.copy(ROOT / "bench" / "mlserver_model.py", model_dir / "mlserver_model.py")
        (model_dir / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": MODEL,
                    "implementation": "mlserver_model.OnnxModel",
                    "parameters": {
                        "uri": str(REFERENCE / "model.onnx"),
                        "extra": {"repo": str(ROOT)},
                    },
                }
            )
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "mlserver.log"

    def __enter__(self) -> MLServer:
        """Start; wait until the model is ready."""
        self._log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(self.folder / MODEL)
        self.proc = subprocess.Popen(
            [str(self.exe), "start", str(self.folder)],
            cwd=self.folder,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("bench.oip: mlserver exited:\n" + self.log_path.read_text())
            try:
                if httpx.get(f"{self.url}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("bench.oip: mlserver not ready:\n" + self.log_path.read_text()[-3000:])

    def __exit__(self, *exc: object) -> None:
        """Stop the whole process group (only the one this object started)."""
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
        self._log.close()


def write_doc(section: str) -> None:
    """Replace (or append) the section after the generated ``python -m bench`` block."""
    text = DOC.read_text()
    start = text.find(HEADING)
    if start == -1:
        text = text.rstrip() + "\n\n" + section + "\n"
    else:
        nxt = text.find("\n## ", start + len(HEADING))
        rest = "" if nxt == -1 else text[nxt:]
        text = text[:start] + section + "\n" + rest
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run both servers, print the table, optionally write the doc."""
    from bench.__main__ import machine

    parser = argparse.ArgumentParser(description="tensor-in path: this service vs MLServer")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--vus", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/MLServer runs")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument(
        "--http-processes", type=int, default=1, help="ours: HEIMDALL_HTTP_PROCESSES"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    exe = ensure_venv(args.venv)
    facts = machine()
    mls_version = (
        subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
        .stdout.strip()
        .split()[-1]
    )
    mls_ort = subprocess.run(
        [
            str(args.venv / "bin" / "python"),
            "-c",
            "import onnxruntime;print(onnxruntime.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    facts["MLServer"] = f"{mls_version} (onnxruntime {mls_ort} in its venv)"
    print("bench.oip: machine", facts, flush=True)

    feeds = tensors()
    want = expected(feeds)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="heimdall-oip-") as tmp:
        folder = Path(tmp)
        body_path = folder / "body.json"
        body_path.write_text(body_of(feeds))
        print(f"bench.oip: body {body_path.stat().st_size / 1e3:.0f} kB", flush=True)

        with Stack({"HEIMDALL_HTTP_PROCESSES": str(args.http_processes)}) as stack:
            workers = stack.pool_pids()
            diff = check_answer(stack.server.url, body_path.read_text(), want)
            print(f"bench.oip: ours ({workers} pool workers) matches ORT, max |diff| {diff:.2g}")
            (folder / "mlserver").mkdir()
            with MLServer(exe, folder / "mlserver", workers) as mls:
                diff_m = check_answer(mls.url, body_path.read_text(), want)
                print(f"bench.oip: MLServer matches ORT, max |diff| {diff_m:.2g}")
                targets = {
                    "ours": (stack.server.url, stack.server.proc.pid),
                    "mlserver": (mls.url, mls.proc.pid),
                }
                rounds: list[dict[str, dict[str, Any]]] = []
                for i in range(args.rounds):
                    order = ["ours", "mlserver"] if i % 2 == 0 else ["mlserver", "ours"]
                    one = {}
                    for name in order:
                        url, pid = targets[name]
                        one[name] = measure(
                            stack.k6_bin,
                            url,
                            pid,
                            body_path,
                            args.vus,
                            args.seconds,
                            folder,
                            f"{name}-{i}",
                        )
                    rounds.append(one)
                runtime_log = mls.log_path.read_text()
            marker = "heimdall-bench runtime: session options "
            hows = {
                line.split(marker, 1)[1].strip()
                for line in runtime_log.splitlines()
                if marker in line
            }
            how = " / ".join(sorted(hows)) or "unknown (no log line)"
            print(f"bench.oip: MLServer runtime session options: {how}", flush=True)
            if "Traceback" in runtime_log:
                print(runtime_log[-2000:], file=sys.stderr)

    runs = {name: combine([r[name] for r in rounds], args.seconds) for name in targets}
    per_round = ", ".join(
        f"{r['ours']['rps']:.0f}/{r['mlserver']['rps']:.0f} = "
        f"{r['ours']['rps'] / r['mlserver']['rps']:.2f}"
        for r in rounds
    )
    ours, mls_run = runs["ours"], runs["mlserver"]
    ratio = ours["rps"] / mls_run["rps"]
    cpu = {k: r["cpu_s"] * 1e3 / r["requests"] for k, r in runs.items()}
    table = [
        "| server | req/s | CPU ms/request | ratio ours/MLServer | p50 / p99 ms | notes |",
        "|---|---|---|---|---|---|",
        f"| heimdall-inference (Granian, {args.http_processes} HTTP + {workers} pool "
        f"processes) | {ours['rps']:.0f} | "
        f"{cpu['ours']:.3f} | {ratio:.2f} (target >= {TARGET_RATIO}) | "
        f"{ours['p50']:.1f} / {ours['p99']:.1f} | failed rate {ours['failed']:.3f}; "
        f"{ours['processes']} processes; machine busy {ours['busy_cores']:.2f} cores, "
        f"other processes {ours['other_cpu_s']:.1f} CPU s; "
        f"k6 {ours['k6_cpu_s'] * 1e3 / ours['requests']:.2f} "
        f"CPU ms/request (excluded) |",
        f"| MLServer {mls_version} ({workers} parallel workers, custom ORT runtime) | "
        f"{mls_run['rps']:.0f} | {cpu['mlserver']:.3f} | 1.00 | "
        f"{mls_run['p50']:.1f} / {mls_run['p99']:.1f} | failed rate {mls_run['failed']:.3f}; "
        f"{mls_run['processes']} processes; machine busy {mls_run['busy_cores']:.2f} cores, "
        f"other processes {mls_run['other_cpu_s']:.1f} CPU s; k6 "
        f"{mls_run['k6_cpu_s'] * 1e3 / mls_run['requests']:.2f} CPU ms/request (excluded) |",
    ]
    rounds_line = (
        f"Per round (req/s ours/MLServer = ratio, {args.rounds} rounds, order alternating): "
        f"{per_round}."
    )
    runtime = time.monotonic() - started
    command = " ".join(["python -m bench.oip", *(argv if argv is not None else sys.argv[1:])])
    print()
    print("\n".join(table))
    print(rounds_line)
    print(
        f"\nCPU per request ours/MLServer {cpu['ours'] / cpu['mlserver']:.2f}; "
        f"runtime {runtime:.0f}s"
    )
    if args.write:
        section = "\n".join(
            [
                HEADING,
                "",
                f"Command: `{command}` (runtime {runtime:.0f} s; written by `bench/oip.py`). Same "
                f"JSON V2 infer body for both servers (batch 1, `data` arrays, "
                f"{len(body_of(feeds)) / 1e3:.0f} kB, "
                "one simulated capture packed by `workers.inputs.pack_capture`), both answers "
                f"checked against ONNX Runtime in-process before loading (max |diff| ours "
                f"{diff:.2g}, MLServer {diff_m:.2g}; tolerance 1e-5). k6 `oip.js` closed loop, "
                f"{args.vus} VUs, {args.seconds:g} s per run after a 3 s warm-up, {args.rounds} "
                "rounds alternating ours/MLServer (both servers resident, only one loaded at a "
                "time; req/s = all requests / all measured seconds, p50 = median of rounds, "
                "p99 = worst round). CPU = user + system of the server's whole process tree "
                "(psutil, before/after), k6 excluded. MLServer: separate virtualenv outside "
                "the repo, "
                f"custom runtime `bench/mlserver_model.py` (ORT session, {how}), "
                f"`parallel_workers` = {workers}, metrics/gRPC on free ports (left on: defaults).",
                "",
                "| machine | |",
                "|---|---|",
                *[f"| {k} | {v} |" for k, v in facts.items()],
                "",
                *table,
                "",
            ]
        )
        write_doc(section)
        print(f"bench.oip: wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
