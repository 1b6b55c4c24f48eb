# syntax=docker/dockerfile:1.7
# heimdall-inference image: runtime dependencies from requirements-runtime.lock (no dev tools,
# no torch), the project (app, workers, telemetry, training incl. the reference model package),
# tini as PID 1, non-root UID 10001. See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---- build stage: a self-contained virtualenv in /opt/venv --------------------------------
FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
# A package index other than PyPI (a mirror, a proxy): --build-arg UV_DEFAULT_INDEX=URL.
ARG UV_DEFAULT_INDEX
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN uv venv /opt/venv --python /usr/local/bin/python3.11
COPY requirements-runtime.lock /tmp/requirements-runtime.lock
# Wheels only: the final image needs no compiler, and neither does this stage.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps --only-binary :all: \
        -r /tmp/requirements-runtime.lock
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY app ./app
COPY workers ./workers
COPY telemetry ./telemetry
COPY training ./training
# --no-deps: every dependency is already pinned above; this adds only our packages.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps . \
 && cd / \
 && /opt/venv/bin/python -c "import app.ops.cli, workers.pool, training; from app.ops.cli import REFERENCE_PACKAGE as p; assert (p / 'model.onnx').is_file(), p" \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# ---- runtime stage ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# tini is not pinned to a Debian revision: the base image's tag already fixes the release
# (bookworm carries one tini, 0.19.0), and Debian rebuilds it under new revisions (0.19.0-1+b3)
# while dropping the old ones from the mirror, so a `tini=0.19.0-1` pin broke the build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 heimdall \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin heimdall \
 && mkdir -p /app/.local \
 && chown -R 10001:10001 /app
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# /app/.local holds the artifact cache (and the embedded sqlite registry when
# MLFLOW_TRACKING_URI is unset); mount a volume / emptyDir there (and on /tmp) for a
# read-only root. With that embedded registry and no model in it, `serve` first registers
# the bundled reference model (HEIMDALL_BOOTSTRAP_REFERENCE=false: wait for one instead), so
# `docker run -p 8000:8000 heimdall-inference:0.1.0` answers at once. REDIS_URL is empty (no
# cache, no control channel): the service's default, 127.0.0.1:6379, is the container itself
# there; compose and Kubernetes set it. Each pool worker maps
# HEIMDALL_POOL_MAX_INFLIGHT x HEIMDALL_POOL_SHM_SLOT_BYTES (2 x 16 MiB) of /dev/shm: give
# the container --shm-size >= workers x 32 MiB + margin (Docker's default is 64 MiB).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEIMDALL_HOST=0.0.0.0 \
    HEIMDALL_PORT=8000 \
    HEIMDALL_ARTIFACT_CACHE=/app/.local/artifacts \
    HEIMDALL_BOOTSTRAP_REFERENCE=true \
    REDIS_URL=
USER 10001:10001
EXPOSE 8000
# Granian drains on SIGTERM; the pool gets HEIMDALL_POOL_DRAIN_TIMEOUT_S (default 20 s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEIMDALL_PORT', '8000') + '/health/ready', timeout=2)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["heimdall-inference", "serve"]
