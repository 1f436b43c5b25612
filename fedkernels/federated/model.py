"""Build the shared model every simulated client trains on: base + LoRA adapters on the targets."""

from __future__ import annotations

import torch
import torch.nn as nn

from fedkernels.nn import LoRAConfig, LoRALinear, inject_lora

__all__ = ["build_model", "head_module_name", "TINY_PRESETS"]

# Random-init models for tests and quick runs; they use the bundled MiniLM tokenizer (vocab 30522).
TINY_PRESETS = {
    "tiny-bert": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64},
}


def head_module_name(model: nn.Module) -> str:
    """Name of the classification head (trained by every client and averaged), e.g. ``classifier``."""
    names = dict(model.named_modules())
    for cand in ("classifier", "score", "lm_head"):
        if cand in names:
            return cand
    raise ValueError(f"cannot find a classification head (classifier/score) in {type(model).__name__}")


def build_model(
    name: str, num_labels: int, lora: LoRAConfig, *, seed: int
) -> tuple[object, nn.Module, dict[str, LoRALinear], str]:
    """(tokenizer, model, LoRA layers by name, head name). Seeded: same seed, same head and LoRA init."""
    from fedkernels.assets import load_model, minilm_path

    torch.manual_seed(seed)
    if name in TINY_PRESETS:
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, num_labels=num_labels,
                         **TINY_PRESETS[name])
        model = BertForSequenceClassification(cfg)
    else:
        tokenizer, model = load_model(name, num_labels=num_labels)
    model.eval()  # dropout of the frozen base off: clients differ only by data and plan
    head = head_module_name(model)
    lora = LoRAConfig(**{**lora.__dict__, "modules_to_save": [head]})
    torch.manual_seed(seed + 1)
    layers = inject_lora(model, lora)
    return tokenizer, model, layers, head
