#!/usr/bin/env bash
# Fetch the wheels that scripts/device_check.py needs and the GPU box lacks, into wheels/ (git-ignored).
#
#   scripts/device-wheels.sh [DEST]      # default DEST: wheels/ ; needs PyPI (pip download), ~3.5 MB
#
# The GPU box has no package index: python 3.12 with torch + CUDA, transformers, accelerate, peft, pyarrow,
# pandas, httpx, typer, pyyaml and prometheus-client, but no fastapi, uvicorn, pydantic or pydantic-settings.
# These wheels travel beside the source tree (the device `run` tool: carry ["wheels"]); the check unpacks
# those the box lacks, or has older, and puts them on sys.path. The list is the closure of fastapi, uvicorn
# and pydantic-settings for CPython 3.12 on manylinux x86_64 (`pip download` without --no-deps fetches
# exactly these). Versions: the ones installed in this checkout's .venv (what the tests ran with), else the
# newest (set PYTHON to use another interpreter's versions).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-wheels}
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
PACKAGES=(
    fastapi starlette annotated-doc uvicorn h11 click anyio idna
    pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions python-dotenv
)

specs=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)
    specs+=("$name${version:+==$version}")
done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary :all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "${specs[@]}"
count=$(find "$DEST" -name '*.whl' | wc -l)
((count == ${#PACKAGES[@]})) || { echo "device-wheels: expected ${#PACKAGES[@]} wheels, got $count" >&2; exit 1; }
echo "device-wheels: $count wheels, $(du -sh "$DEST" | cut -f1), in $DEST:"
printf '  %s\n' "${specs[@]}"
