"""Build the shared model every simulated client trains on: base + LoRA adapters on the targets.

`build_model` builds a sequence classifier (a new head, trained and averaged); `build_causal_lm` a causal LM
(Llama, Qwen2, Mistral, GPT-2 families, the bundled SmolLM2, or the random-init ``tiny-llama`` / ``tiny-gpt2``
presets), whose LM head stays frozen: only the adapters train.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fedkernels.nn import LoRAConfig, LoRALinear, inject_lora

__all__ = ["build_model", "head_module_name", "TINY_PRESETS", "TINY_LM_PRESETS", "build_causal_lm",
           "default_lora_targets", "TARGET_CANDIDATES"]

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
    name: str, num_labels: int, lora: LoRAConfig, *, seed: int, targets: list[str] | str | None = None
) -> tuple[object, nn.Module, dict[str, LoRALinear], str]:
    """(tokenizer, model, LoRA layers by name, head name). Seeded: same seed, same head and LoRA init.

    ``targets`` names the adapted modules; None (or empty) picks `default_lora_targets` for the architecture
    (BERT / MiniLM: query, value). ``lora.target_modules`` is not used.
    """
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
    chosen = targets or default_lora_targets(model)
    lora = LoRAConfig(**{**lora.__dict__, "target_modules": chosen, "modules_to_save": [head]})
    torch.manual_seed(seed + 1)
    layers = inject_lora(model, lora)
    return tokenizer, model, layers, head


# Random-init causal LMs for tests; like tiny-bert they use the bundled MiniLM tokenizer (vocab 30522, no chat
# template, SEP ends a response). Sizes keep a forward+backward at 4 x 64 tokens in milliseconds.
TINY_LM_PRESETS = {
    "tiny-llama": ("llama", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512}),
    "tiny-gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512}),
}

# Default LoRA targets, first set whose every name is a linear (or GPT-2 Conv1D) leaf of the model: the
# attention query and value projections, as in the LoRA paper (Hu et al. 2021, section 7.1) and FlexLoRA/FLoRA.
# Llama / Qwen2 / Mistral: q_proj, v_proj; GPT-2: the fused c_attn (a Conv1D, so fan_in_fan_out; LoRALinear
# detects it); BERT: query, value; Falcon / GPT-NeoX: query_key_value.
TARGET_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"), ("c_attn",), ("query", "value"), ("query_key_value",), ("Wqkv",),
)


def default_lora_targets(model: nn.Module) -> list[str]:
    """The attention projections LoRA targets by default, read from the model's own modules.

    Raises:
        ConfigError: no candidate set fits; the message lists some linear leaf names to choose from.
    """
    from fedkernels.errors import ConfigError
    from fedkernels.nn.lora import _is_conv1d

    # LoRALinear counts as its wrapped layer (an injected model keeps its defaults); its base_layer does not.
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, LoRALinear) or ((isinstance(m, nn.Linear) or _is_conv1d(m)) and
                                               not n.endswith(".base_layer"))}
    for cand in TARGET_CANDIDATES:
        if set(cand) <= leaves:
            return list(cand)
    raise ConfigError(f"no default LoRA targets for {type(model).__name__}: none of {list(TARGET_CANDIDATES)} "
                      f"are all linear layers of it; set lora_targets from {sorted(leaves)[:12]}")


def _tiny_causal_lm(name: str):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from fedkernels.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    family, sizes = TINY_LM_PRESETS[name]
    specials = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, **sizes, **specials))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, **sizes, **specials))
    return tokenizer, model


def build_causal_lm(
    name: str, lora: LoRAConfig | None = None, *, seed: int, targets: list[str] | str | None = None
) -> tuple[object, nn.Module, dict[str, LoRALinear], None]:
    """(tokenizer, model, LoRA layers by name, None): a causal LM with adapters; it has no trained head.

    ``lora`` gives rank, alpha, dropout and backend (its ``target_modules`` are not used); ``targets`` names
    the adapted modules, None (or empty) picks `default_lora_targets` for the architecture. Seeded: same
    seed, same base (for the random presets) and same LoRA initialisation.
    """
    from fedkernels.assets import load_causal_lm

    torch.manual_seed(seed)
    if name in TINY_LM_PRESETS:
        tokenizer, model = _tiny_causal_lm(name)
    else:
        tokenizer, model = load_causal_lm(name)
    model.eval()  # dropout of the frozen base off: clients differ only by data and plan
    chosen = targets or default_lora_targets(model)
    base = lora.__dict__ if lora is not None else {}
    lora = LoRAConfig(**{**base, "target_modules": chosen, "modules_to_save": []})
    torch.manual_seed(seed + 1)
    layers = inject_lora(model, lora)
    return tokenizer, model, layers, None
