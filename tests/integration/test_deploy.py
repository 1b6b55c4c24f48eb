"""Deployment artefacts checked without a Docker engine or a cluster.

compose.yaml against the vendored compose-specification schema, the kustomize tree against
Kubernetes' JSON schemas, every environment variable against the settings the service reads,
and the Dockerfile's own CMD and HEALTHCHECK run against a real server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from app.settings import all_env_names
from tests.support.procs import ROOT, bootstrap_registry, free_port

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
STANDARD_ENV = re.compile(r"^(OTEL_\w+|MLFLOW_TRACKING_URI|REDIS_URL|PYTHON\w*|PATH)$")
# Variables read by third-party images, not by our service.
FOREIGN_IMAGE_ENV = {"grafana": re.compile(r"^GF_\w+$"), "k6": re.compile(r"^BASE_URL$")}


# ---------------------------------------------------------------- Dockerfile ------------------


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stage = -1
    result = []
    for line in logical:
        word, _, args = line.partition(" ")
        if word.upper() == "FROM":
            stage += 1
        result.append((stage, word.upper(), args.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    """Instructions of the last stage."""
    instructions = dockerfile_instructions()
    last = max(stage for stage, _, _ in instructions)
    return [(word, args) for stage, word, args in instructions if stage == last]


def exec_form(args: str) -> list[str]:
    """Parse a JSON exec-form argument list (fails on shell form)."""
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    assert all(isinstance(v, str) for v in value), args
    return value


def dockerfile_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV must use KEY=VALUE: {args}"
                env[key] = value
    return env


def test_dockerfile_final_stage_facts() -> None:
    stage = final_stage()
    words = [w for w, _ in stage]
    args = {w: a for w, a in stage}
    assert args["USER"].split(":")[0] == "10001"
    assert exec_form(args["ENTRYPOINT"]) == ["/usr/bin/tini", "--"]
    assert exec_form(args["CMD"]) == ["heimdall-inference", "serve"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert "HEALTHCHECK" in words
    assert "/health/ready" in args["HEALTHCHECK"]
    assert dockerfile_env()["HEIMDALL_HOST"] == "0.0.0.0"  # noqa: S104 - container bind address
    # USER comes before CMD/ENTRYPOINT and after every RUN: nothing runs as root at serve time.
    last_run = max(i for i, w in enumerate(words) if w == "RUN")
    assert words.index("USER") > last_run
    run_text = " ".join(a for w, a in stage if w == "RUN")
    assert "tini" in run_text
    for compiler in ("gcc", "build-essential", "g++", "clang"):
        assert compiler not in run_text, f"compiler {compiler} in the final stage"


def test_dockerfile_pins_and_no_dev_or_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [a for _, w, a in dockerfile_instructions() if w == "FROM"]
    assert any(a.startswith("ghcr.io/astral-sh/uv:0.") for a in froms), froms
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert base
    assert base.group(1).startswith("python:3.11-slim-bookworm")
    for ref in froms:
        image = ref.split()[0]
        assert ":latest" not in image, image
        assert ":" in image or image.startswith("$"), image
    assert "requirements-runtime.lock" in text
    assert "requirements.lock " not in text
    assert "requirements.lock\n" not in text


def test_runtime_lock_is_the_dev_lock_minus_dev_tools() -> None:
    """Same versions as requirements.lock, and none of the dev/train extras."""

    def pins(path: Path) -> dict[str, str]:
        found = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", path.read_text(), re.MULTILINE)
        return {name.lower(): version for name, version in found}

    dev, runtime = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-runtime.lock")
    assert runtime, "empty runtime lock"
    for name, version in runtime.items():
        assert dev.get(name) == version, f"{name}=={version} differs from requirements.lock"
    for tool in ("pytest", "ruff", "mypy", "hypothesis", "torch", "schemathesis", "k6"):
        assert tool not in runtime
    for needed in ("litestar", "granian", "onnxruntime", "mlflow-skinny", "redis", "pyproj"):
        assert needed in runtime


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    rules = [
        r
        for r in (ROOT / ".dockerignore").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    ]
    assert rules[0] == "**", "allow-list style .dockerignore expected"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for word, args in [(w, a) for _, w, a in dockerfile_instructions()]:
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _ = args.split()
        for source in sources:
            name = source.rstrip("*")
            if name.startswith("--"):
                continue
            assert name in allowed, f"{source} is copied but excluded by .dockerignore"
            if not source.endswith("*"):  # `README.md*` is optional on purpose
                assert (ROOT / name).exists(), f"{name} is copied but missing"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"/health/ready not 200 after {timeout}s: {log.read_text()[-3000:]}")


@pytest.fixture
def image_like_server(
    tmp_path: Path, redis_url: str
) -> Iterator[tuple[str, dict[str, str], subprocess.Popen[bytes]]]:
    """The Dockerfile's CMD started as-is, with its ENV, from an empty working directory."""
    registry = bootstrap_registry(tmp_path / "registry")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **{k: v for k, v in dockerfile_env().items() if k != "PATH"},
        **registry,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "REDIS_URL": redis_url,
        "HEIMDALL_HOST": "127.0.0.1",  # the image binds 0.0.0.0; tests stay on loopback
        "HEIMDALL_PORT": str(port),
        "HEIMDALL_POOL_WORKERS": "1",
        "HEIMDALL_CACHE_PREFIX": f"heimdall:deploy-test:{os.getpid()}:",
    }
    cmd = exec_form(dict(final_stage())["CMD"])
    assert shutil.which(cmd[0], path=env["PATH"]), f"{cmd[0]} is not an installed console script"
    workdir = tmp_path / "app"
    workdir.mkdir()
    log = tmp_path / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, log, timeout=90)
        yield f"http://127.0.0.1:{port}", env, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.slow
def test_dockerfile_cmd_serves_healthcheck_passes_and_sigterm_exits_cleanly(
    image_like_server: tuple[str, dict[str, str], subprocess.Popen[bytes]],
) -> None:
    url, env, proc = image_like_server
    healthcheck = dict(final_stage())["HEALTHCHECK"]
    probe = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    probe[0] = shutil.which(probe[0], path=env["PATH"]) or probe[0]
    assert subprocess.run(probe, env=env, timeout=10, check=False).returncode == 0
    # The same probe fails against a port nobody serves, so it can tell.
    dead = {**env, "HEIMDALL_PORT": str(free_port())}
    assert (
        subprocess.run(probe, env=dead, timeout=10, check=False, capture_output=True).returncode
        != 0
    )
    assert httpx.get(url + "/health/live", timeout=5).status_code == 200

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(45) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health/live", timeout=1)


# ---------------------------------------------------------------- compose ---------------------


def test_compose_validates_against_the_compose_spec() -> None:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    jsonschema.validate(COMPOSE, schema, cls=jsonschema.Draft202012Validator)


def test_compose_schema_rejects_a_broken_file() -> None:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["heimdall"]["depends_on"]["redis"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.partition(":")[2]


def test_compose_images_are_pinned() -> None:
    for name, service in COMPOSE["services"].items():
        tag = _image_tag(service["image"])
        assert tag, f"{name}: image {service['image']} has no tag"
        assert tag != "latest", f"{name}: image {service['image']} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag {tag} is not a version"


def test_compose_long_running_services_have_healthchecks() -> None:
    for name, service in COMPOSE["services"].items():
        if name in ("bootstrap", "k6"):  # one-shot jobs
            continue
        if "healthcheck" not in service:
            assert service.get("x-no-healthcheck-reason"), f"{name} has no healthcheck"
            continue
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_dependency_graph() -> None:
    services = COMPOSE["services"]
    heimdall = services["heimdall"]
    assert heimdall["deploy"]["replicas"] >= 2
    assert "ports" not in heimdall, "replicas must not bind host ports; the LB does"
    assert heimdall["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert isinstance(spec, dict), f"{name}: depends_on {dep} without condition"
            dep_service = services[dep]
            if "healthcheck" in dep_service:
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
    bootstrap = services["bootstrap"]
    assert bootstrap["command"] == ["heimdall-inference", "bootstrap"]
    assert bootstrap["image"] == heimdall["image"]
    assert bootstrap["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert heimdall["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert heimdall["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert heimdall["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert services["k6"]["profiles"] == ["k6"]
    assert services["k6"]["environment"]["BASE_URL"].startswith("http://lb:")
    # Grace period covers the pool drain (default 20 s) with margin.
    assert heimdall["stop_grace_period"] == "45s"
    # The artifact cache is writable by the image's user (UID 10001), not root-owned.
    assert any(t.startswith("/app/.local:") and "uid=10001" in t for t in heimdall["tmpfs"]), (
        heimdall.get("tmpfs")
    )
    # /dev/shm holds 2 x 16 MiB of IQ slots per worker (Docker's default is 64 MiB).
    workers = int(heimdall["environment"]["HEIMDALL_POOL_WORKERS"])
    assert heimdall["shm_size"].endswith("m") and int(heimdall["shm_size"][:-1]) > workers * 32


def test_compose_mounted_config_files_exist() -> None:
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and volume.startswith("./"):
                source = ROOT / volume.split(":")[0]
                assert source.exists(), f"{name}: {source} missing"


def test_load_balancer_and_prometheus_target_the_replicas() -> None:
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server\s+heimdall:8000\s+resolve", nginx)
    assert "/lb-health" in nginx
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["heimdall"]["dns_sd_configs"][0]["names"] == ["heimdall"]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == ["otel-collector:8889"]


def test_otel_collector_pipelines() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"].endswith(":4318")
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    pipelines = config["service"]["pipelines"]
    assert set(pipelines["metrics"]["exporters"]) == {"prometheus", "debug"}
    assert "debug" in pipelines["traces"]["exporters"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} used but not defined"


def test_grafana_dashboard_covers_every_service_metric() -> None:
    dashboard = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "heimdall-inference.json").read_text()
    )
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "heimdall_inference_requests_total",
        "heimdall_inference_duration_seconds",
        "heimdall_cache_requests_total",
        "heimdall_model_reloads_total",
        "heimdall_pool_workers",
        "heimdall_pool_queue_depth",
        "heimdall_pool_worker_restarts_total",
        "heimdall_field_feedback_total",
        "heimdall_field_error_meters_bucket",
    ):
        assert metric in exprs, f"no panel on {metric}"
    assert "by (le, phase)" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = datasources["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])


def test_docker_check_override_only_swaps_images() -> None:
    """The override `make docker-check` adds changes images (to stand-ins) and profiles only."""
    override = yaml.safe_load((DEPLOY / "check" / "compose.check.yaml").read_text())
    standins = (DEPLOY / "check" / "standins" / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", standins, re.MULTILINE))
    for name, service in override["services"].items():
        assert name in COMPOSE["services"], name
        assert set(service) <= {"image", "profiles"}, (name, set(service))
        if "image" in service:
            repo = service["image"].split(":")[0]
            assert repo.startswith("heimdall-check/"), service["image"]
            assert repo.removeprefix("heimdall-check/") in targets, repo
    # Every upstream image of the default profile is replaced or left out; the project's own
    # image (heimdall, bootstrap) is the one the check builds.
    for name, service in COMPOSE["services"].items():
        if name in ("heimdall", "bootstrap") or service.get("profiles"):
            continue
        assert name in override["services"], f"{name}: upstream image not replaced"


# ---------------------------------------------------------------- kubernetes ------------------


def kustomize_build(folder: Path = K8S) -> list[dict[str, Any]]:
    """The subset of ``kustomize build`` this tree uses: resources, labels, images.

    Any other kustomization field fails loudly rather than being ignored.
    """
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "resources", "labels", "images"}
    assert set(kustomization) <= supported, set(kustomization) - supported
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((folder / resource).read_text()) if d)
    for entry in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = doc.get("spec", {}).get("template")
            if entry.get("includeTemplates") and template:
                template["metadata"].setdefault("labels", {}).update(entry["pairs"])
            assert not entry.get("includeSelectors"), "selector labels not emulated"
    for image in kustomization.get("images", []):
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in kustomize_build()}


def test_k8s_manifests_validate_against_kubernetes_schemas(
    manifests: dict[str, dict[str, Any]],
) -> None:
    import kubernetes_validate

    assert set(manifests) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for doc in manifests.values():
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_k8s_schema_validation_can_fail(manifests: dict[str, dict[str, Any]]) -> None:
    import kubernetes_validate

    broken = json.loads(json.dumps(manifests["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33", strict=True)


def test_k8s_deployment_contract(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "heimdall-inference:0.1.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert "startupProbe" in container
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert pod["terminationGracePeriodSeconds"] == 45
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/app/.local", "/tmp"} <= mounts  # noqa: S108 - emptyDir mount point
    # /dev/shm backs the pool's IQ slots: memory-backed and large enough for every worker.
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]  # noqa: S108
    workers = int(manifests["ConfigMap"]["data"]["HEIMDALL_POOL_WORKERS"])
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    limit = volumes[shm["name"]]["emptyDir"]["sizeLimit"]
    assert limit.endswith("Mi") and int(limit[:-2]) > workers * 2 * 16
    secret_refs = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert [(e["name"], e["valueFrom"]["secretKeyRef"]["optional"]) for e in secret_refs] == [
        ("HEIMDALL_CONTROL_HMAC_SECRET", True)
    ]
    assert (
        container["envFrom"][0]["configMapRef"]["name"]
        == manifests["ConfigMap"]["metadata"]["name"]
    )
    # The drain fits in the grace period after preStop.
    drain = float(manifests["ConfigMap"]["data"].get("HEIMDALL_POOL_DRAIN_TIMEOUT_S", "20"))
    assert 5 + drain < pod["terminationGracePeriodSeconds"]
    # Selectors match the pod template across Service, PDB and Deployment.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        manifests["Service"]["spec"]["selector"],
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] in ports


# ---------------------------------------------------------------- environment names -----------


def _env_of_compose() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, service in COMPOSE["services"].items():
        env = service.get("environment") or {}
        names = set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
        found[name] = names
    return found


def test_every_env_var_is_a_known_setting() -> None:
    known = all_env_names()
    sources: dict[str, set[str]] = {"Dockerfile": set(dockerfile_env())}
    for service, names in _env_of_compose().items():
        foreign = FOREIGN_IMAGE_ENV.get(service)
        if service in ("redis", "mlflow", "lb", "otel-collector", "prometheus"):
            assert not names, f"{service}: unexpected environment {names}"
            continue
        sources[f"compose:{service}"] = {n for n in names if not (foreign and foreign.match(n))}
    for doc in kustomize_build():
        if doc["kind"] == "ConfigMap":
            sources["k8s:ConfigMap"] = set(doc["data"])
        for container in (
            doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            sources[f"k8s:{container['name']}"] = {e["name"] for e in container.get("env", [])}
    unknown = {
        where: sorted(n for n in names if n not in known and not STANDARD_ENV.match(n))
        for where, names in sources.items()
    }
    assert not any(unknown.values()), unknown
    # And the check itself bites: a misspelt setting is caught.
    assert "HEIMDALL_POOL_WORKER" not in known
    assert not STANDARD_ENV.match("HEIMDALL_POOL_WORKER")
