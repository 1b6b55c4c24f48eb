#!/usr/bin/env python3
"""``make docker-check``: build the image for real and run it on a private Docker engine.

Needs root (it runs its own ``dockerd``) and only the standard library. Steps:

1. ``docker.io`` and ``debootstrap`` from Debian when missing (``apt-get``; root only).
2. A private ``dockerd``: own socket, exec root and pid file in a temporary directory, data root
   under the cache directory (so layers and BuildKit's download cache survive between runs),
   no iptables rules, no ``docker0`` bridge, no change to the host's IP forwarding. It is
   stopped by its pid when the check ends, whatever happened.
3. Stand-in base images under the names the Dockerfile expects, because no image registry is
   reachable here: ``python:3.11-slim-bookworm`` from a debootstrap'ed Debian bookworm with
   python3.11 (plus the machine's CA bundle, so pip/uv inside the build reach the same package
   index as the host), and ``ghcr.io/astral-sh/uv:VERSION`` from uv's PyPI wheel. The rootfs
   tarball and the wheel are cached in ``~/.cache/heimdall-docker-check``.
4. ``docker build`` of the project image from a copy of the Dockerfile without its
   ``# syntax=`` line (that frontend image cannot be fetched here).
5. Runs of the image: a bare ``docker run`` answers the README's example with the documented
   answer; with ``HEIMDALL_BOOTSTRAP_REFERENCE=false`` it is live but not ready until a model
   is registered, then ready and healthy; hardened (``--read-only``, tmpfs, all capabilities
   dropped, ``--shm-size``) it runs as UID 10001, cannot write its root filesystem, answers,
   and exits 0 on SIGTERM well within the drain timeout.
6. ``--full`` only: the compose stack (see ``compose_check.py``).

Exit codes: 0 passed, 1 the image or stack is wrong, 75 (EX_TEMPFAIL) the check could not run
here (not root, no Debian mirror, no package index, dockerd does not start) — ``.ci/run``
reports that as a skip, everything else as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("HEIMDALL_CHECK_CACHE", Path.home() / ".cache/heimdall-docker-check"))
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client builds with BuildKit without buildx
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "heimdall-inference:0.1.0"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOTFS_PACKAGES = "python3.11,python3-venv,python3-pip,ca-certificates"
EX_SKIP = 75
STARTED = time.monotonic()
SUMMARY: list[str] = []


class Skip(Exception):
    """The check cannot run on this machine (infrastructure, not the image)."""


class Failure(Exception):
    """The image or the stack does not do what it must."""


def log(message: str) -> None:
    """Progress line with the elapsed time."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def summary(line: str) -> None:
    """A line of the final report (pasted in docs/deploy.md)."""
    SUMMARY.append(line)
    log(line)


def run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    quiet: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise CalledProcessError with its output attached."""
    done = subprocess.run(
        cmd,
        env=env,
        timeout=timeout,
        check=False,
        capture_output=quiet,
        text=True,
    )
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done


# ------------------------------------------------------------------ tools ------------------------


def ensure_tools(packages: list[str]) -> None:
    """Install the Debian packages whose programs are missing (root only)."""
    wanted = {"docker.io": DOCKERD, "debootstrap": "/usr/sbin/debootstrap"}
    wanted.update(
        {"docker-compose": "/usr/bin/docker-compose"} if "docker-compose" in packages else {}
    )
    missing = [pkg for pkg, path in wanted.items() if pkg in packages and not Path(path).exists()]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise Skip(f"{', '.join(missing)} missing and no apt-get to install them")
    log(f"installing {' '.join(missing)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update", "-qq"], env=env, timeout=300)
        run(["apt-get", "install", "-y", "-qq", *missing], env=env, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise Skip(f"apt-get could not install {missing}: {getattr(exc, 'stderr', '')}") from exc


# ------------------------------------------------------------------ engine -----------------------


class Engine:
    """A private dockerd, reachable only through its own socket."""

    def __init__(self) -> None:
        """Choose the paths; nothing starts yet."""
        self.tmp = Path(tempfile.mkdtemp(prefix="hdc-", dir="/tmp"))
        self.socket = self.tmp / "docker.sock"
        self.data_root = CACHE / "engine"
        self.pid_file = CACHE / "dockerd.pid"  # also read by the next run to clean up a crash
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "1",
            "DOCKER_CONFIG": str(self.tmp / "client"),
            "COMPOSE_DOCKER_CLI_BUILD": "1",
        }

    def _stop_leftover(self) -> None:
        """A dockerd of an earlier, killed run of this check (same data root) is stopped."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if (
                cmdline
                and cmdline[0].endswith(b"dockerd")
                and str(self.data_root).encode() in cmdline
            ):
                log(f"stopping the dockerd (pid {pid}) left by an earlier run")
                os.kill(pid, signal.SIGTERM)
                for _ in range(60):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.5)

    def _lock(self) -> None:
        """One check at a time per cache (they share the data root); wait up to 10 minutes."""
        import fcntl

        self.lock_file = (CACHE / "lock").open("w")
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Skip(f"another docker-check holds {CACHE / 'lock'}") from None
                time.sleep(2)

    def start(self) -> None:
        """Start dockerd and wait for its API."""
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._stop_leftover()
        (self.tmp / "daemon.json").write_text("{}")
        cmd = [
            DOCKERD,
            f"--host=unix://{self.socket}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.tmp / 'x'}",
            f"--pidfile={self.tmp / 'docker.pid'}",
            f"--config-file={self.tmp / 'daemon.json'}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--default-address-pool=base=172.29.0.0/16,size=24",
        ]
        log_file = (self.tmp / "dockerd.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid_file.write_text(str(self.proc.pid))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.docker("version", check=False).returncode == 0:
                version = self.docker("version", "-f", "{{.Server.Version}}").stdout.strip()
                driver = self.docker("info", "-f", "{{.Driver}}").stdout.strip()
                summary(
                    f"engine: private dockerd {version} (pid {self.proc.pid}, {driver}, "
                    f"data root {self.data_root})"
                )
                return
            time.sleep(0.5)
        tail = (self.tmp / "dockerd.log").read_text(errors="replace")[-2000:]
        raise Skip(f"dockerd did not start:\n{tail}")

    def stop(self) -> None:
        """Remove our containers, stop dockerd by its pid, remove the temporary directory."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=120)
                # Keep the cache (layers, BuildKit) but not the images replaced by this build,
                # and bound the build cache (the most recently used 2 GB stay).
                self.docker("image", "prune", "-f", check=False, timeout=120)
                self.docker("builder", "prune", "-f", "--keep-storage", "2GB", check=False,
                            timeout=300)  # fmt: skip
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            log(f"dockerd (pid {self.proc.pid}) stopped")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        subprocess.run(["umount", "-R", str(self.tmp / "x")], capture_output=True, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600, quiet: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The Debian docker client against this engine."""
        return run([DOCKER, *args], env=self.env, check=check, timeout=timeout, quiet=quiet)

    def has_image(self, ref: str, label: str | None = None) -> bool:
        """Whether ``ref`` exists (with ``heimdall.check`` label ``label`` when given)."""
        done = self.docker(
            "image", "inspect", "-f", '{{index .Config.Labels "heimdall.check"}}', ref, check=False
        )
        return done.returncode == 0 and (label is None or done.stdout.strip() == label)


# ------------------------------------------------------------------ base images ------------------


def dockerfile_text() -> str:
    """The project's Dockerfile."""
    return (ROOT / "Dockerfile").read_text()


def debian_mirror() -> str:
    """The host's Debian mirror (deb822 or one-line sources), else deb.debian.org."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", path.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    with contextlib.suppress(FileNotFoundError):
        match = re.search(
            r"^deb\s+(\S+/debian)\s+bookworm",
            Path("/etc/apt/sources.list").read_text(),
            re.MULTILINE,
        )
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def python_rootfs() -> tuple[Path, str]:
    """A cached tarball of Debian bookworm with python3.11, like python:3.11-slim-bookworm."""
    mirror = debian_mirror()
    ca = HOST_CA.read_bytes() if HOST_CA.exists() else b""
    key = hashlib.sha256(f"bookworm|{ROOTFS_PACKAGES}|{mirror}|".encode() + ca).hexdigest()[:12]
    tarball = CACHE / f"rootfs-bookworm-python3.11-{key}.tar"
    if tarball.exists():
        summary(f"base rootfs: cached {tarball.name} ({tarball.stat().st_size / 2**20:.0f} MiB)")
        return tarball, key
    work = CACHE / "rootfs.tmp"
    shutil.rmtree(work, ignore_errors=True)
    began = time.monotonic()
    log(f"debootstrap bookworm from {mirror} (first run only)")
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={ROOTFS_PACKAGES}",
                "bookworm",
                str(work),
                mirror,
            ],
            timeout=1200,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise Skip(
            f"debootstrap failed (mirror {mirror}): {getattr(exc, 'stdout', '')[-1500:]}"
        ) from exc
    # The python image has its interpreter in /usr/local/bin; the Dockerfile names that path.
    for name in ("python3.11", "python3", "python"):
        link = work / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to("/usr/bin/python3.11")
    if ca:  # the machine's trust (e.g. an egress proxy's CA) for pip/uv/apt inside builds
        with (work / "etc/ssl/certs/ca-certificates.crt").open("ab") as bundle:
            bundle.write(b"\n" + ca)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        for child in (work / junk).glob("*"):
            if child.is_file() or child.is_symlink():
                child.unlink()
            elif child.is_dir() and child.name != "partial":
                shutil.rmtree(child, ignore_errors=True)
    (work / "etc/apt/sources.list").write_text(f"deb {mirror} bookworm main\n")
    partial = tarball.with_suffix(".partial")
    run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
    partial.rename(tarball)
    shutil.rmtree(work, ignore_errors=True)
    summary(
        f"base rootfs: debootstrap'ed in {time.monotonic() - began:.0f} s "
        f"({tarball.stat().st_size / 2**20:.0f} MiB, cached as {tarball.name})"
    )
    return tarball, key


def import_python_image(engine: Engine) -> None:
    """``python:3.11-slim-bookworm`` stand-in from the Debian rootfs."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile_text(), re.MULTILINE)
    ref = match.group(1) if match else "python:3.11-slim-bookworm"
    tarball, key = python_rootfs()
    if engine.has_image(ref, key):
        return
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        # uv ships its own roots unless told; this makes it use the bundle above.
        "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        f"LABEL heimdall.check={key}",
        'CMD ["python3"]',
    ]
    args = [a for change in changes for a in ("--change", change)]
    run([DOCKER, "import", *args, str(tarball), ref], env=engine.env, timeout=600)
    log(f"imported {ref} (stand-in from Debian)")


def import_uv_image(engine: Engine) -> None:
    """``ghcr.io/astral-sh/uv:VERSION`` stand-in: the binary from uv's PyPI wheel at ``/uv``."""
    match = re.search(r"^FROM (ghcr.io/astral-sh/uv:(\S+)) AS uv", dockerfile_text(), re.MULTILINE)
    if not match:
        return
    ref, version = match.groups()
    if engine.has_image(ref, version):
        return
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(f"uv-{version}-*manylinux*x86_64*.whl"))
    if not found:
        try:
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary",
                    ":all:",
                    "--platform",
                    "manylinux_2_17_x86_64",
                    "-d",
                    str(wheels),
                    f"uv=={version}",
                ],
                timeout=300,
            )
        except subprocess.CalledProcessError as exc:
            raise Skip(
                f"cannot download uv {version} from the package index: {exc.stderr}"
            ) from exc
        found = sorted(wheels.glob(f"uv-{version}-*.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(found[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith("/scripts/uv"))
            (Path(tmp) / "uv").write_bytes(wheel.read(member))
        os.chmod(Path(tmp) / "uv", 0o755)  # noqa: S103 - an executable
        run(["tar", "-C", tmp, "--owner=0", "--group=0", "-cf", f"{tmp}/uv.tar", "uv"])
        run(
            [DOCKER, "import", "--change", f"LABEL heimdall.check={version}", f"{tmp}/uv.tar", ref],
            env=engine.env,
            timeout=300,
        )
    log(f"imported {ref} (stand-in from the uv {version} wheel)")


# ------------------------------------------------------------------ build ------------------------


def package_index() -> str:
    """The index the host's pip uses (PIP_INDEX_URL, pip config), else PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        done = run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], check=False)
        url = done.stdout.strip() if done.returncode == 0 else ""
    return url or "https://pypi.org/simple"


def probe_index(url: str) -> None:
    """The package index answers (else the build cannot work here: a skip, not a failure)."""
    import ssl

    context = ssl.create_default_context(cafile=str(HOST_CA) if HOST_CA.exists() else None)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/uv/", timeout=30, context=context) as reply:
            reply.read(1)
    except (urllib.error.URLError, OSError) as exc:
        raise Skip(f"package index {url} unreachable: {exc}") from exc


def build_image(engine: Engine) -> None:
    """Docker build of the project, from a Dockerfile copy without the ``# syntax=`` line."""
    index = package_index()
    probe_index(index)
    copy = engine.tmp / "Dockerfile"
    copy.write_text(
        "".join(
            line
            for line in dockerfile_text().splitlines(keepends=True)
            if not line.lower().startswith("# syntax=")
        )
    )
    cmd = [
        "build",
        "--network=host",
        "--progress=plain",
        "-f",
        str(copy),
        "-t",
        IMAGE,
        "-t",
        IMAGE.split(":")[0] + ":latest",
    ]
    if index != "https://pypi.org/simple":
        cmd += ["--build-arg", f"UV_DEFAULT_INDEX={index}"]
    for attempt in (1, 2):
        began = time.monotonic()
        done = engine.docker(*cmd, str(ROOT), check=False, timeout=1500)
        seconds = time.monotonic() - began
        if done.returncode == 0:
            break
        output = done.stdout + done.stderr
        (CACHE / "last-build.log").write_text(output)
        log(f"build attempt {attempt} failed after {seconds:.0f} s:\n{output[-4000:]}")
    else:
        raise Failure(
            "docker build failed twice (log in ~/.cache/heimdall-docker-check/last-build.log)"
        )
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    cached = (done.stdout + done.stderr).count(" CACHED")
    summary(f"build: {seconds:.1f} s ({cached} cached steps), {IMAGE} is {size / 1e6:.0f} MB")


# ------------------------------------------------------------------ runs -------------------------


def http(url: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """Status and body of a GET (or a JSON POST when body is given); 0 if no connection."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST" if body is not None else "GET",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_status(url: str, status: int, timeout: float) -> float | None:
    """Seconds until GET url answered ``status``, or None."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if http(url, timeout=3)[0] == status:
            return time.monotonic() - began
        time.sleep(0.25)
    return None


def readme_answer() -> tuple[float, float, str]:
    """The position and version the README documents for examples/request.json."""
    text = (ROOT / "README.md").read_text()
    position = re.search(r'"position": \{"latitude": ([-\d.e]+), "longitude": ([-\d.e]+)\}', text)
    version = re.search(r'"model": \{"name": "[^"]+", "version": "(\w+)"\}', text)
    if not position or not version:
        raise Failure("README no longer documents the example's answer")
    return float(position.group(1)), float(position.group(2)), version.group(1)


def predict_example(base: str) -> dict[str, Any]:
    """POST the README's example; the decoded answer (fails on any other status)."""
    status, body = http(base + "/v1/predict", (ROOT / "examples/request.json").read_bytes(), 30)
    if status != 200:
        raise Failure(f"POST {base}/v1/predict answered {status}: {body[:500]!r}")
    return json.loads(body)


# ONNX Runtime picks float32 kernels by CPU (AVX2, AVX-512, ...), so the same model on the same
# input differs in the last float32 bits between machines: 5e-8 deg (6 mm) between the Intel VM
# that wrote the README's figure and an AMD EPYC one. 1e-6 deg (0.1 m) allows that and still
# tells any other model or version apart (they differ by hundreds of metres or more).
ANSWER_TOLERANCE_DEG = 1e-6


def check_answer(answer: dict[str, Any], where: str) -> str:
    """The answer must be the README's (same position, same version); a one-line description."""
    lat, lon, version = readme_answer()
    got = answer["position"]
    same = (got["latitude"], got["longitude"], answer["model"]["version"]) == (lat, lon, version)
    close = (
        abs(got["latitude"] - lat) < ANSWER_TOLERANCE_DEG
        and abs(got["longitude"] - lon) < ANSWER_TOLERANCE_DEG
    )
    if answer["model"]["version"] != version or not close:
        raise Failure(
            f"{where}: answer {got} version {answer['model']['version']} differs from "
            f"the README's {lat}, {lon} version {version}"
        )
    return (
        f"{got['latitude']}, {got['longitude']} version {answer['model']['version']} "
        f"({'identical to' if same else 'within 1e-6 deg of'} the README / make run)"
    )


class Container:
    """A detached container with its port 8000 published on a free loopback port."""

    def __init__(self, engine: Engine, name: str, *args: str) -> None:
        """Start it (removing a leftover of the same name)."""
        self.engine, self.name = engine, name
        engine.docker("rm", "-f", name, check=False)
        engine.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "hdc",
            "-p",
            "127.0.0.1::8000",
            *args,
            IMAGE,
            timeout=120,
        )
        self.started = time.monotonic()
        port = engine.docker("port", name, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        self.base = f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        """The container's output (last part)."""
        done = self.engine.docker("logs", "--tail", "60", self.name, check=False)
        return done.stdout + done.stderr

    def wait(self, path: str, status: int, timeout: float) -> float:
        """Seconds since start until ``path`` answered ``status``; a Failure otherwise."""
        if wait_status(self.base + path, status, timeout) is None:
            raise Failure(f"{self.name}: {path} not {status} within {timeout} s\n{self.logs()}")
        return time.monotonic() - self.started

    def health(self) -> str:
        """Docker's view of the HEALTHCHECK."""
        return self.engine.docker(
            "inspect", "-f", "{{.State.Health.Status}}", self.name
        ).stdout.strip()

    def exec(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside."""
        return self.engine.docker("exec", self.name, *cmd, check=False, timeout=120)

    def stop(self, grace: int = 45) -> tuple[float, int]:
        """SIGTERM (docker stop): seconds until exit, and the exit code."""
        began = time.monotonic()
        self.engine.docker("stop", "-t", str(grace), self.name, timeout=grace + 30)
        seconds = time.monotonic() - began
        code = int(self.engine.docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout)
        return seconds, code


def check_bare_run(engine: Engine) -> None:
    """``docker run -p 8000:8000 heimdall-inference`` with no configuration answers at once."""
    box = Container(engine, "hdc-bare")
    ready = box.wait("/health/ready", 200, 120)
    answer = predict_example(box.base)
    summary(
        f"bare docker run: ready after {ready:.1f} s (bootstrapped the reference model); "
        f"examples/request.json -> {check_answer(answer, 'bare run')}"
    )
    logs = box.logs()
    if "bootstrapped the reference model" not in logs:
        raise Failure("bare run: no bootstrap message in the logs")
    if "WARNING" in logs or "ERROR" in logs:
        raise Failure(f"bare run: warnings or errors in the logs\n{logs}")
    box.stop()


def check_waits_for_model(engine: Engine) -> None:
    """Told not to bootstrap: live, not ready until a model is registered, then healthy."""
    box = Container(
        engine,
        "hdc-nomodel",
        "-e",
        "HEIMDALL_BOOTSTRAP_REFERENCE=false",
        "-e",
        "HEIMDALL_POOL_WORKERS=1",
    )
    live = box.wait("/health/live", 200, 120)
    time.sleep(3)
    status, _ = http(box.base + "/health/ready")
    predict_status, _ = http(
        box.base + "/v1/predict", (ROOT / "examples/request.json").read_bytes()
    )
    if status != 503 or predict_status != 503:
        raise Failure(
            f"no model: /health/ready {status}, /v1/predict {predict_status} (want 503)\n"
            + box.logs()
        )
    health = box.health()
    # The serving process creates the empty sqlite registry's tables on its first lookup; a
    # bootstrap racing that migration fails ("table ... already exists"), so wait for the
    # lookup's outcome (the model is missing) and still allow a retry.
    deadline = time.monotonic() + 60
    while "applying revision 0 failed" not in box.logs() and time.monotonic() < deadline:
        time.sleep(0.5)
    for attempt in range(1, 4):
        boot = box.exec("heimdall-inference", "bootstrap")
        if boot.returncode == 0:
            break
        log(f"bootstrap attempt {attempt} failed: {(boot.stdout + boot.stderr)[-300:]}")
        time.sleep(5)
    else:
        raise Failure(f"bootstrap inside the container failed: {boot.stdout}{boot.stderr}")
    registered = time.monotonic()
    if wait_status(box.base + "/health/ready", 200, 120) is None:
        raise Failure(f"not ready within 120 s of the bootstrap\n{box.logs()}")
    ready_after = time.monotonic() - registered
    deadline = time.monotonic() + 40
    while box.health() != "healthy" and time.monotonic() < deadline:
        time.sleep(1)
    healthy = box.health()
    if healthy != "healthy":
        raise Failure(f"docker health {healthy!r} 40 s after ready")
    check_answer(predict_example(box.base), "after bootstrap")
    summary(
        f"no model (HEIMDALL_BOOTSTRAP_REFERENCE=false): live after {live:.1f} s, ready 503 "
        f"and predict 503, docker health {health!r}; after `heimdall-inference bootstrap` "
        f"in the container (attempt {attempt}): ready {ready_after:.1f} s after it returned, "
        "docker health "
        "'healthy'"
    )
    box.stop()


def check_hardened(engine: Engine) -> None:
    """Read-only root, tmpfs where it writes, no capabilities, sized /dev/shm; SIGTERM exits 0."""
    box = Container(
        engine,
        "hdc-hardened",
        "--read-only",
        "--tmpfs",
        "/app/.local:rw,uid=10001,gid=10001,mode=0700,size=256m",
        "--tmpfs",
        "/tmp:rw,mode=1777,size=64m",
        "--shm-size",
        "128m",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-e",
        "HEIMDALL_POOL_WORKERS=2",
    )
    ready = box.wait("/health/ready", 200, 120)
    uid = box.exec("id", "-u").stdout.strip()
    if uid != "10001":
        raise Failure(f"runs as uid {uid!r}, not 10001")
    denied = box.exec("python", "-c", "open('/app/x', 'w')")
    if denied.returncode == 0 or "Read-only file system" not in denied.stderr:
        raise Failure(f"root filesystem is writable: {denied.stderr}")
    shm = box.exec("df", "-m", "/dev/shm").stdout.split("\n")[1].split()[1]
    answer = predict_example(box.base)
    line = check_answer(answer, "hardened run")
    # A few requests in flight while SIGTERM arrives: they are answered, then it exits 0.
    body = (ROOT / "examples/request.json").read_bytes()
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        inflight = [
            pool.submit(
                http,
                box.base + "/v1/predict",
                body.replace(b'"sim-7-1"', f'"drain-{i}"'.encode()),
                30,
            )
            for i in range(8)
        ]
        seconds, code = box.stop()
        statuses = sorted({f.result()[0] for f in inflight})
    if seconds > 5:  # slow but within the contract: say where the time went
        log(engine.docker("logs", "-t", "--tail", "12", box.name, check=False).stdout)
    if code != 0:
        raise Failure(f"exit code {code} after SIGTERM\n{box.logs()}")
    if seconds > 20:
        raise Failure(f"SIGTERM took {seconds:.1f} s (drain timeout 20 s)")
    summary(
        f"hardened run (--read-only, tmpfs /app/.local + /tmp, --cap-drop ALL, "
        f"no-new-privileges, --shm-size 128m = {shm} MiB /dev/shm, 2 workers): uid {uid}, "
        f"write to / refused, ready after {ready:.1f} s, answer {line}"
    )
    summary(
        f"SIGTERM (docker stop) with 8 requests sent: exit code {code} after {seconds:.1f} s "
        f"(drain timeout 20 s); request statuses {statuses}"
    )


# ------------------------------------------------------------------ main -------------------------


@contextlib.contextmanager
def engine_running() -> Iterator[Engine]:
    """A started private engine, always stopped afterwards (also on SIGTERM/SIGINT)."""
    engine = Engine()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit code says pass (0), fail (1) or could not run here (75)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also bring up the compose stack")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop the cached engine data (layers, build cache) first",
    )
    args = parser.parse_args(argv)
    passed = 0
    try:
        if os.geteuid() != 0:
            raise Skip("needs root (it installs docker.io and runs a private dockerd)")
        ensure_tools(["docker.io", "debootstrap"] + (["docker-compose"] if args.full else []))
        if args.fresh:
            shutil.rmtree(CACHE / "engine", ignore_errors=True)
        with engine_running() as engine:
            import_python_image(engine)
            import_uv_image(engine)
            engine.docker("network", "create", "hdc", check=False)
            for check in (build_image, check_bare_run, check_waits_for_model, check_hardened):
                check(engine)
                passed += 1
            if args.full:
                from compose_check import check_compose

                passed += check_compose(engine)
    except Skip as exc:
        print(
            f"\ndocker-check SKIPPED (cannot run here, not a failure of the image): {exc}",
            flush=True,
        )
        return EX_SKIP
    except Failure as exc:
        print(f"\ndocker-check FAILED: {exc}", flush=True)
        print(f"docker-check: {passed} passed, 1 failed")
        return 1
    print(f"\n== docker-check passed in {time.monotonic() - STARTED:.0f} s ==")
    for line in SUMMARY:
        print(f"  {line}")
    print(f"docker-check: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.modules.setdefault("docker_check", sys.modules["__main__"])  # one Skip class, one SUMMARY
    sys.exit(main())
