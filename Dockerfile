# convsync: the worker image. Build from the repository root:
#   docker build -t convsync:0.1.0 .
# Default command is the long-running service (`convsync run`); override the command for
# `migrate`, `sync`, `status` or `simulate`. Checks: tests/deploy/test_deploy_files.py (offline)
# and ci/image_test.py (built and run for real). Every Python package comes from a hash-checked
# lock: requirements.lock (runtime) and requirements-build.lock (the builder's pip, setuptools).
#
# BASE: any Debian image whose `python` is CPython 3.11 with venv (default: the official image).
# Behind a TLS-intercepting proxy, give its CA bundle as the build secret `ca`; it is mounted
# for the install steps only and never stored in a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t convsync:0.1.0 .
ARG BASE=python:3.11.14-slim-trixie

# --- builder: the locked dependencies and a wheel of this project, installed into /opt/venv ---
FROM ${BASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The builder's tools live in /opt/build; /opt/venv (the image's) gets no pip or setuptools.
COPY requirements-build.lock requirements.lock ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --no-deps --require-hashes -r requirements-build.lock \
    && python -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps --require-hashes \
       --only-binary=:all: -r requirements.lock
# README.md* matches nothing when the readme is absent; pyproject.toml is enough to build.
COPY pyproject.toml README.md* ./
# The runtime and the tooling (`simulate`); migrations and the cookbook go into the wheel.
COPY worker/ ./worker/
COPY convsync_tools/ ./convsync_tools/
COPY migrations/ ./migrations/
COPY cookbook/ ./cookbook/
# `pip check`: the lock must hold everything the project needs (it fails the build otherwise).
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps --no-index \
       /wheels/*.whl \
    && /opt/build/bin/pip --python /opt/venv/bin/python check

# --- runtime: the same Python, the venv (migrations inside), a non-root user; no build tools --
FROM ${BASE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CONVSYNC_LOG_FORMAT=json \
    CONVSYNC_HTTP_PORT=8080

# The base's own pip, setuptools and wheel (the official image has them) are not needed to run.
RUN (python -m pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null || true) \
    && groupadd --system --gid 10001 convsync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin convsync

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd; any other uid
# works too (nothing in the image is written at run time).
USER 10001:10001
EXPOSE 8080

# Python is PID 1 (exec form, no shell) and handles SIGTERM from its first instruction: `run`
# lets the running pass commit for CONVSYNC_SHUTDOWN_GRACE seconds, releases its claims and
# exits 0; the other commands stop at once (exit 1 when work was cut short).
STOPSIGNAL SIGTERM
# True for every command: `convsync run` is healthy when /healthz answers, any other command
# (migrate, sync, simulate...) while its process lives. Build with the docker format
# (podman/buildah: --format docker): the OCI format has no HEALTHCHECK.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "worker.healthcheck"]

ENTRYPOINT ["convsync"]
CMD ["run"]
