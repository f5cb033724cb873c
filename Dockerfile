# ddpm-pipe image: the project installed by scripts/install.sh (the same recipe as `make setup`
# and CI), run as a non-root user, entrypoint `ddpm-pipe` (scripts/entrypoint.sh).
#
#   docker build -t ddpm-pipe:0.1.0 .                                          # CPU torch
#   docker build -t ddpm-pipe:0.1.0-cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker run --rm ddpm-pipe:0.1.0 train --help
#   scripts/smoke.sh docker run --rm ddpm-pipe:0.1.0                          # what CI checks
#
# Only the tree copy, scripts/install.sh and scripts/entrypoint.sh happen here; CI runs both
# scripts (tests/infra/test_image.py), so the image cannot drift from what is tested.
FROM python:3.11-slim

# The torch build: TORCH_SPEC is passed to install.sh; TORCH_INDEX_URL is the wheel index that
# holds it (cpu, cu126, cu128, ...). The local tag (+cpu, +cu128) sorts above PyPI's wheel.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG USER=ddpm
ARG UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# wget: KubeRay's readiness/liveness probes call it inside Ray containers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid ${UID} --shell /bin/bash ${USER}

# Installed into the image's own Python (/usr/local/bin), which is on PATH even for the login
# shells that KubeRay and the Ray cluster launcher start (`bash -lc`), unlike a venv.
WORKDIR /opt/ddpm-pipe
COPY . /opt/ddpm-pipe
RUN PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} TORCH_SPEC=${TORCH_SPEC} \
    scripts/install.sh /usr/local/bin/python

USER ${USER}
ENV HOME=/home/${USER} \
    DDPM_HOME=/home/${USER}/.ddpm
WORKDIR /home/${USER}
RUN mkdir -p ${DDPM_HOME}
ENTRYPOINT ["/opt/ddpm-pipe/scripts/entrypoint.sh"]
CMD ["--help"]
