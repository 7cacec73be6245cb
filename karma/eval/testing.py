"""Tiny random causal LMs in the real folder format, for fast tests and the lead's experiment tests."""

from __future__ import annotations

from pathlib import Path


def make_tiny_causal_lm(path: str | Path, *, seed: int = 0, lora_of: str | Path | None = None) -> Path:
    """A 2-layer, hidden-32 random Llama with SmolLM2's tokenizer (and chat template), saved at `path`.

    With `lora_of`, save instead a random (non-zero) LoRA adapter on top of that tiny model folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from karma.models import smollm2_path

    path = Path(path)
    torch.manual_seed(seed)
    if lora_of is not None:
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(lora_of)
        peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # PEFT starts B at zero: make the adapter change the model
        peft_model.save_pretrained(path)
        return path
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger random logits than the default init: options get visibly different scores
        model.lm_head.weight.normal_(std=0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
