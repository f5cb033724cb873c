#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE ARGS...` runs `ddpm-pipe ARGS...`.
# DDPM_HOME defaults to ~/.ddpm (the Dockerfile sets it under the non-root user's home).
# `ddpm-pipe` is found on PATH (the image installs into /usr/local/bin; tests put .venv/bin first).
# Ray nodes use the same image with the entrypoint overridden (`ray start ...`), see infra/.
set -euo pipefail
export DDPM_HOME="${DDPM_HOME:-$HOME/.ddpm}"
mkdir -p "$DDPM_HOME"
exec ddpm-pipe "$@"
