# The SyncHire interview agent, as Cloud Run runs it (docs/DEPLOYMENT.md).
#
#   docker build --platform=linux/amd64 -t sync-hire-agent .
#   docker run --rm -p 8080:8080 sync-hire-agent        # development: offline stand-ins, no keys
#
# Two stages. The builder installs the project and its runtime dependencies (never the dev
# extra) into a virtual environment at $VIRTUAL_ENV and compiles their bytecode; the runtime
# stage copies only that environment onto a clean python:3.13-slim and runs it unprivileged.
#
# tests/test_deploy.py runs the builder's COPY and RUN lines in a clean virtual environment and
# starts the server from it, so: keep every install step in this stage's RUN lines, and refer
# to the environment as $VIRTUAL_ENV, never by its path.

ARG PYTHON_IMAGE=python:3.13-slim

FROM ${PYTHON_IMAGE} AS builder
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# No pip inside the environment: the base image's pip installs into it (--python).
RUN python -m venv --without-pip "$VIRTUAL_ENV"
# Only what the image needs (.dockerignore keeps the rest of the context out).
COPY pyproject.toml README.md server.py ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY interview ./interview
COPY web ./web
# Runtime dependencies only (the demo page in web/ is package data, installed beside server.py).
# Every one ships a manylinux wheel (the espeak-ng voice and the
# pocketsphinx transcriber with its English model included), so no compiler is needed.
RUN python -m pip --python "$VIRTUAL_ENV/bin/python" install --no-compile .
# Bytecode for everything, once, so a cold start compiles nothing. unchecked-hash: the image is
# immutable, and the .pyc files stay valid whatever timestamps COPY --from gives the sources.
RUN "$VIRTUAL_ENV/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        "$VIRTUAL_ENV/lib"

FROM ${PYTHON_IMAGE} AS runtime
ENV VIRTUAL_ENV=/opt/venv
ENV PATH="$VIRTUAL_ENV/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 \
    OUTBOX_DIR=/var/outbox
# An unprivileged user that owns nothing but its working directory and the outbox (on Cloud
# Run the outbox is a Cloud Storage volume mounted over /var/outbox; see docs/OUTBOX.md).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /app /var/outbox \
    && chown app:app /app /var/outbox
COPY --from=builder $VIRTUAL_ENV $VIRTUAL_ENV
WORKDIR /app
USER 10001:10001
# Cloud Run sets PORT (8080 unless the service says otherwise); the server listens on $PORT.
EXPOSE 8080
# For docker run and compose; Cloud Run ignores it and uses its own startup probe on /health
# (set by cloudbuild.yaml and deploy/deploy-cloud-run.sh).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4)"]
# Exec form: python is PID 1 and gets SIGTERM itself. `python -m server` drains interviews at
# once and stops uvicorn within 9 s, inside the 10 s Cloud Run allows before SIGKILL.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
