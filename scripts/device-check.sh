#!/usr/bin/env bash
# The GPU check in one command (scripts/device_check.py; benchmarks/README.md, "GPU check"):
#
#   scripts/device-wheels.sh                 # once, where PyPI is reachable: wheels/ (fastapi, pydantic, ...)
#   scripts/device-check.sh [--out FILE]     # on the GPU box, from the source tree: one JSON on stdout
#   scripts/device-check.sh --cpu --tiny     # anywhere: the same code paths on tiny configs, in seconds
#
# With the device `run` tool: carry ["wheels"], command `scripts/device-check.sh --out $OUT/device_check.json`,
# timeout_s 600 (the check stops itself at --budget-s, default 540 s).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
[[ -n $PY ]] || { echo "device-check: no python found (set PYTHON)" >&2; exit 1; }
exec "$PY" scripts/device_check.py "$@"
