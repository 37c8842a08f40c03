# syntax=docker/dockerfile:1
# The operator and collector image: `kubetune operator`, `kubetune collect` and the other light
# subcommands (no torch). Multi-arch (linux/amd64, linux/arm64; .github/workflows/release.yml
# builds and pushes it on a version tag). Build from the repository root:
#   docker build -t ghcr.io/kubetune/kubetune:0.1.0 .
# Every dependency is pinned by constraints/operator.txt (.ci/constraints.py writes it from the
# tested venv): images built on different days hold the same versions.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VERSION=0.1.0

# --- build: the kubetune wheel and wheels of all its dependencies ------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the wheel is built from: the symlinks kubetune/operator, kubetune/trainer and
# kubetune/collector point at the folders beside it (see pyproject). Never dev/ or tests/.
COPY pyproject.toml README.md ./
COPY kubetune/ kubetune/
COPY operator/ operator/
COPY collector/ collector/
COPY trainer/ trainer/
COPY constraints/operator.txt constraints/operator.txt
RUN python -m pip wheel --no-cache-dir --constraint constraints/operator.txt --wheel-dir /wheels ".[operator,collector]"

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION
LABEL org.opencontainers.image.title="kubetune" \
      org.opencontainers.image.description="kubetune operator and collector" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# Pods run with a read-only root filesystem and a writable emptyDir on /tmp: the home directory
# and every cache (Hugging Face datasets, XDG) live there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache
RUN groupadd --gid 10001 kubetune \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kubetune
# The wheels come in through a bind mount, so they never become a layer of the image.
# DL3013 (pin pip versions) does not apply: --no-index installs only the wheels built above from
# this very checkout, so every version is fixed by the build stage and nothing comes from an index.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels "kubetune[operator,collector]" \
    && kubetune --version
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kubetune"]
CMD ["--help"]
