# syntax=docker/dockerfile:1
# bids-ketdcm BIDS-App image.
#
#   docker build -t bids-ketdcm .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t bids-ketdcm:cuda .   # CUDA torch
#   docker run --rm -v /path/ds:/data:ro -v /path/out:/out bids-ketdcm \
#       /data /out participant --participant-label 101
#
# The CUDA build bundles the CUDA runtime (PyTorch's wheels); the host needs only the
# NVIDIA driver: `docker run --gpus all ...` or `apptainer run --nv ...`, then
# `--device auto` (the default) inverts on the GPU.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

# torch build: "cpu", or a CUDA build of the PyTorch index such as "cu128" or "cu126".
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# The full BIDS validator (a self-contained binary on PyPI; runs offline).
ARG BIDS_VALIDATOR_VERSION=3.0.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch first, in a layer of its own: it is most of the image and changes least.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

COPY pyproject.toml README.md /src/
COPY bids_ketdcm /src/bids_ketdcm
RUN pip install --no-cache-dir "/src" "bids-validator-deno==${BIDS_VALIDATOR_VERSION}" \
    && python -c "import torch, bids_ketdcm; print('bids-ketdcm', bids_ketdcm.__version__, 'torch', torch.__version__)"


FROM python:${PYTHON_VERSION}-slim-bookworm

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG TORCH_VARIANT=cpu
ARG IMAGE=ghcr.io/bids-ketdcm/bids-ketdcm

LABEL org.opencontainers.image.title="bids-ketdcm" \
      org.opencontainers.image.description="BIDS-App: spectral DCM of resting-state fMRI to predict ketamine response in depression (torch ${TORCH_VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/bids-ketdcm/bids-ketdcm" \
      org.opencontainers.image.url="https://github.com/bids-ketdcm/bids-ketdcm" \
      org.opencontainers.image.documentation="https://github.com/bids-ketdcm/bids-ketdcm#readme" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN useradd --uid 1000 --user-group --no-log-init --no-create-home --home-dir /tmp --shell /usr/sbin/nologin bidsapp

COPY --from=build /opt/venv /opt/venv

# Writable places only: HOME and every cache live under /tmp, so the image itself can be
# read-only (Singularity/Apptainer, `docker run --read-only --tmpfs /tmp`). Nothing is
# downloaded at run time: the ROI sets and templates ship in the packages.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    NILEARN_DATA=/tmp/nilearn_data \
    NILEARN_SHARED_DATA=/tmp/nilearn_data \
    TORCH_HOME=/tmp/torch \
    DENO_DIR=/tmp/deno \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIDS_KETDCM_CONTAINER=${IMAGE}:${VERSION}

USER 1000:1000
WORKDIR /tmp

ENTRYPOINT ["bids-ketdcm"]
CMD ["--help"]
