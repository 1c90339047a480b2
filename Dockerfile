# syntax=docker/dockerfile:1
#
# genrec serving image: FastAPI + onnxruntime, serving dependencies only.
# The training half (and its heavy deep-learning stack) never enters this image: only
# pyproject.toml and service/ are copied, and only the `serve` extra plus one onnxruntime
# extra are installed.
#
#   docker build -t genrec:local .                          # CPU (onnxruntime)
#   docker build -t genrec:gpu --build-arg ORT_EXTRA=gpu .  # GPU (onnxruntime-gpu), see deploy/README.md
#
# The model bundle is not baked in. Mount a models root (the repo's models/ folder, laid out
# as <name>/<version>/manifest.json) at /app/models, read-only: the newest bundle under
# GENREC_MODELS_ROOT=/app/models is served. To pin one, set GENREC_BUNDLE_DIR to its folder,
# e.g. -e GENREC_BUNDLE_DIR=/app/models/beauty-tiger/20261123-0400, or mount a single bundle
# folder at /app/models and set GENREC_BUNDLE_DIR=/app/models.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: a virtualenv with the serving dependencies and the `service` package
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Which onnxruntime extra of pyproject.toml to install: `cpu` (onnxruntime) or `gpu`
# (onnxruntime-gpu). The two share one module name, so exactly one is installed.
ARG ORT_EXTRA=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer, so that editing service/ does not reinstall them:
# install the project against an empty placeholder package, then the real code on top.
COPY pyproject.toml ./
RUN case "${ORT_EXTRA}" in cpu|gpu) ;; *) echo "ORT_EXTRA must be cpu or gpu, got '${ORT_EXTRA}'" >&2; exit 1;; esac \
    && mkdir -p service \
    && touch service/__init__.py \
    && pip install --no-cache-dir "./[serve,${ORT_EXTRA}]"

COPY service/ ./service/
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import service, onnxruntime, fastapi, uvicorn; print('onnxruntime', onnxruntime.__version__)"

# ---------------------------------------------------------------------------------------------
# runtime: the virtualenv, a non-root user, nothing else
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="genrec" \
      org.opencontainers.image.description="Generative retrieval recommendation service (onnxruntime)" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GENREC_HOST=0.0.0.0 \
    GENREC_PORT=8000 \
    GENREC_MODELS_ROOT=/app/models

RUN groupadd --system --gid 10001 genrec \
    && useradd --system --uid 10001 --gid genrec --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin genrec \
    && mkdir -p /app/models /app/spool \
    && chown -R genrec:genrec /app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Numeric ids (the genrec user created above) so that runtimes can verify non-root.
USER 10001:10001

EXPOSE 8000

# Liveness only (the process answers HTTP); readiness (/health/ready: bundle loaded, warm-up
# done) is what orchestrators should route on, see docker-compose.yml. slim has no curl, so
# python's urllib does the request; an HTTP error status raises and exits non-zero.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('GENREC_PORT', '8000') + '/health/live', timeout=2)"]

# SIGTERM starts the graceful drain (readiness false, batcher drains, connections close).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
