"""Memory model accuracy: predicted vs measured bytes (hidden 256, 6 blocks, batch 8 x 128, peft LoRA r=8).

Run: ``PYTHONPATH=$PWD python bench/solvers_memory_accuracy.py [--padded]`` (CPU, about a minute). Prints, per
architecture, the largest relative error of `MemoryModel.saved_count` against `solvers.memory.measure` over 12
plans, for the model calibrated by measurement (`from_model`) and the analytic one (`from_config`), on the total
and on the plan-dependent part (saved activations + gradients + optimizer states).
"""

from __future__ import annotations

import random
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from solvers.memory import MemoryModel, find_lora_params, infer_blocks, measure

B, S, R, H, L = 8, 128, 8, 256, 6


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=500, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                         intermediate_size=4 * H, num_labels=4)
        model, targets = BertForSequenceClassification(cfg), ["query", "value", "intermediate.dense"]
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=500, n_embd=H, n_layer=L, n_head=4, num_labels=4, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1)
        model, targets = GPT2ForSequenceClassification(cfg), ["c_attn", "c_fc"]
    else:
        cfg = LlamaConfig(vocab_size=500, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=688, num_labels=4, pad_token_id=0)
        model, targets = LlamaForSequenceClassification(cfg), ["q_proj", "v_proj", "down_proj"]
    model.eval()
    return cfg, get_peft_model(model, LoraConfig(r=R, target_modules=targets, lora_dropout=0.0)), targets


def main(padded: bool) -> None:
    torch.set_num_threads(1)
    for kind in ("bert", "gpt2", "llama"):
        cfg, pm, targets = build(kind)
        mask = torch.ones(B, S, dtype=torch.long)
        if padded:
            mask[::2, -S // 4:] = 0
        batch = {"input_ids": torch.randint(1, 500, (B, S)), "attention_mask": mask,
                 "labels": torch.randint(0, 4, (B,))}
        lora = find_lora_params(pm)
        head = [p for n, p in pm.named_parameters() if ".classifier." in n or ".score." in n]
        cal = MemoryModel.from_model(pm, batch, lora, infer_blocks(lora), always_trainable=head)
        ana = MemoryModel.from_config(cfg, batch_size=B, seq_len=S, rank=R, targets=targets, num_labels=4,
                                      padded=padded)
        names = list(lora)
        rng = random.Random(0)
        plans = [[], [names[-1]], [names[0]], names] + [rng.sample(names, rng.randint(1, len(names)))
                                                        for _ in range(8)]
        worst = {"cal": 0.0, "ana": 0.0, "cal_dyn": 0.0, "ana_dyn": 0.0}
        for plan in plans:
            meas = measure(pm, batch, head + [p for n in plan for p in lora[n]])
            dyn = meas.total - meas.param_bytes
            for key, mm in (("cal", cal), ("ana", ana)):
                pred = mm.saved_count(plan)  # the saved-tensor count; bench/memory_peak.py checks the peak
                worst[key] = max(worst[key], abs(pred - meas.total) / meas.total)
                worst[key + "_dyn"] = max(worst[key + "_dyn"], abs(pred - meas.param_bytes - dyn) / dyn)
        full = measure(pm, batch, head + [p for n in names for p in lora[n]])
        print(f"{kind} targets={targets} ({len(names)} modules), full plan {full.total / 2**20:.1f} MiB "
              f"(saved {full.saved_bytes / 2**20:.1f} MiB). Max relative error, total: calibrated "
              f"{worst['cal']:.3%}, analytic {worst['ana']:.3%}; plan-dependent part: calibrated "
              f"{worst['cal_dyn']:.3%}, analytic {worst['ana_dyn']:.3%}")


if __name__ == "__main__":
    main(padded="--padded" in sys.argv[1:])
