# ddpm-pipe image: the project installed by scripts/install.sh (the same recipe as `make setup`
# and CI), run as a non-root user, entrypoint `ddpm-pipe` (scripts/entrypoint.sh).
#
#   docker build -t ddpm-pipe:0.1.0 .                                    # CPU torch (PyTorch's CPU index)
#   docker build -t ddpm-pipe:0.1.0-cuda --build-arg TORCH=cuda .        # CUDA torch (PyPI's Linux build)
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) ...        # runs record the commit
#   docker run --rm ddpm-pipe:0.1.0 train --help
#   scripts/smoke.sh docker run --rm ddpm-pipe:0.1.0                    # what CI checks
#
# Layers: the dependencies (from pyproject.toml and constraints.txt alone) are installed before the
# source is copied, so a source edit reinstalls neither torch nor Ray. No pip/uv/apt cache stays.
# The base image is pinned by digest: python:3.11-slim as found pinned in public Dockerfiles (no
# registry could be queried where this was written: check it with `docker buildx imagetools
# inspect python:3.11-slim` and move it on purpose).
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
# The torch build: cpu (default) or cuda.
ARG TORCH=cpu

FROM ${PYTHON_IMAGE} AS base
ARG USER=ddpm
ARG UID=1000
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# wget: KubeRay's readiness/liveness probes call it inside Ray containers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid ${UID} --shell /bin/bash ${USER}

# TORCH_INDEX_URL is read by scripts/install.sh; empty means the default index (PyPI: CUDA on Linux).
FROM base AS torch-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM base AS torch-cuda
ENV TORCH_INDEX_URL=

FROM torch-${TORCH} AS image
ARG TORCH_SPEC=torch==2.13.0
ARG USER=ddpm
ARG GIT_COMMIT=
# Installed into the image's own Python (/usr/local/bin), which is on PATH even for the login
# shells that KubeRay and the Ray cluster launcher start (`bash -lc`), unlike a venv.
WORKDIR /opt/ddpm-pipe
COPY pyproject.toml README.md LICENSE constraints.txt /opt/ddpm-pipe/
COPY scripts/install.sh /opt/ddpm-pipe/scripts/install.sh
RUN DEPS_ONLY=1 CONSTRAINTS=constraints.txt TORCH_SPEC=${TORCH_SPEC} \
    scripts/install.sh /usr/local/bin/python pipeline,server
COPY . /opt/ddpm-pipe
RUN CONSTRAINTS=constraints.txt TORCH_SPEC=${TORCH_SPEC} \
    scripts/install.sh /usr/local/bin/python pipeline,server

USER ${USER}
ENV HOME=/home/${USER} \
    DDPM_HOME=/home/${USER}/.ddpm \
    DDPM_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /home/${USER}
RUN mkdir -p ${DDPM_HOME}
ENTRYPOINT ["/opt/ddpm-pipe/scripts/entrypoint.sh"]
CMD ["--help"]
