#!/usr/bin/env bash
# Build the engines of a deployment: ./build.sh CONFIG [--dry-run] [--role ROLE] [--force] [--engines-dir DIR]
# A thin wrapper over `trt-disagg build` (run from the repository root: engines go to ./engines/ unless the
# config's engines_dir or --engines-dir says otherwise). Creates the virtualenv first when it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
if [ "$#" -lt 1 ]; then
  echo "usage: ./build.sh CONFIG [--dry-run] [--role ROLE] [--force] [--engines-dir DIR]" >&2
  exit 2
fi
if [ ! -x "$ROOT/.venv/bin/trt-disagg" ]; then
  make -C "$ROOT" venv
fi
exec "$ROOT/.venv/bin/trt-disagg" build "$@"
