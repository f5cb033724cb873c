#!/usr/bin/env bash
# Smoke-check an installed ddpm-pipe through the command prefix that runs it, e.g.
#   scripts/smoke.sh scripts/entrypoint.sh              # the entrypoint against a venv (CI)
#   scripts/smoke.sh docker run --rm ddpm-pipe:0.1.0     # a built image (needs a Docker engine)
# Checks: `--help` lists the commands the infra/ manifests use; `config show` resolves a preset.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMMAND_PREFIX..." >&2; exit 2; }
help=$("$@" --help)
for cmd in data train tune sample run config; do
  grep -qw -- "$cmd" <<<"$help" || { echo "smoke: '$cmd' missing from --help" >&2; exit 1; }
done
shown=$("$@" config show --config digits --json)
grep -q '"config"' <<<"$shown" || { echo "smoke: config show printed no config" >&2; exit 1; }
echo "smoke: ok ($*)"
