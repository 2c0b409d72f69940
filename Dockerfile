# convsync: the worker image. Build from the repository root:
#   docker build -t convsync:0.1.0 .
# Default command is the long-running service (`convsync run`); override the command for
# `migrate`, `sync`, `status` or `simulate`. Tests: tests/deploy/test_deploy_files.py.

# --- builder: a wheel of this project, installed with its dependencies into /opt/venv --------
FROM python:3.11.14-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md* matches nothing when the readme is absent; pyproject.toml is enough to build.
COPY pyproject.toml README.md* ./
COPY worker/ ./worker/
RUN python -m venv /opt/venv \
    && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl

# --- runtime: the same Python, the venv, the migrations, a non-root user ----------------------
FROM python:3.11.14-slim-trixie AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CONVSYNC_MIGRATIONS_DIR=/app/migrations \
    CONVSYNC_LOG_FORMAT=json \
    CONVSYNC_HTTP_PORT=8080

RUN groupadd --system --gid 10001 convsync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin convsync

COPY --from=builder /opt/venv /opt/venv
COPY migrations/ /app/migrations/
COPY cookbook/ /app/cookbook/
WORKDIR /app

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# Python is PID 1 (exec form, no shell): SIGTERM reaches convsync, which lets the running pass
# commit for CONVSYNC_SHUTDOWN_GRACE seconds, releases its claims and exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CONVSYNC_HTTP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["convsync"]
CMD ["run"]
