#!/usr/bin/env bash
# Creates (or refreshes) ./.venv with everything ep-runtime needs on a CPU-only machine:
# torch 2.13 (CPU), triton, Ray, mpi4py with the pip MPICH, and the project with its dev extras.
# Idempotent: a second run only checks. GPU machines install the project into their own image
# instead (see docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13"))' 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then pip install -q "$wheel"; else pip install -q "torch==2.13.0"; fi
fi
pip install -q -e ".[ray,mpi,dev]" "mpich>=4.2"
.venv/bin/ep-launch --version
