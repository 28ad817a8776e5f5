# syntax=docker/dockerfile:1
# Image for every gplr service (topic creation, stream worker, trainer, batch commands).
#
#   docker build -t gplr .                                   # CPU torch (default)
#   docker build -t gplr --build-arg TORCH_VARIANT=cu128 .   # CUDA 12.8 torch for the trainer
#
# Two stages: the builder resolves wheels into a virtualenv; the runtime copies only that
# virtualenv, so compilers and pip caches never reach the image that runs.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
# "cpu" or a CUDA tag of the PyTorch wheel index (cu126, cu128, ...).
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip
# torch first, from the PyTorch index, so resolving the project below keeps this build
# instead of pulling the default (CUDA) wheel from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
# README.m[d]: the package's long description; the pattern keeps a checkout without it buildable.
COPY pyproject.toml README.m[d] gplr_stream.py ./
COPY core ./core
COPY streams ./streams
COPY recsys ./recsys
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gplr-stream" \
      org.opencontainers.image.description="Streaming customer personas from purchases (GPLR)"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    GPLR_DATA_DIR=/var/lib/gplr
COPY --from=builder /opt/venv /opt/venv
# Non-root: the services only need to write their state directory.
RUN groupadd --system --gid 10001 gplr \
    && useradd --system --uid 10001 --gid gplr --home-dir /var/lib/gplr --shell /usr/sbin/nologin gplr \
    && mkdir -p /var/lib/gplr \
    && chown gplr:gplr /var/lib/gplr
USER gplr
WORKDIR /var/lib/gplr
VOLUME ["/var/lib/gplr"]
# Metrics port the compose file sets (GPLR_METRICS_PORT); Prometheus scrapes it inside the compose network.
EXPOSE 9108
ENTRYPOINT ["gplr"]
CMD ["--help"]
