"""Predicted vs measured allocator peak of one training step (issue 13), per model and plan.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/memory_peak.py [--batch 8 --seq 128] [--device cuda]``.
For tiny random-init BERT, Llama and GPT-2 (4 blocks, tests/nn/models.py) and the bundled MiniLM-L6 with peft
LoRA (r=8, dropout 0), a padded token batch, AdamW: the memory model calibrated by measurement on that batch
(`MemoryModel.from_model`) predicts the peak of plans of 1 module, half the modules and all of them, and
`solvers.measure.measure_peak` measures it (CPU: torch.profiler memory events; CUDA: max_memory_allocated,
memory_reserved reported). The analytic model of the same config (`MemoryModel.from_config`, no weights) is
printed next to it: its distance to the calibrated prediction is how far ``fedkernels plan --model`` is off.
Writes ``bench/results/<device>-memory-peak-b<batch>s<seq>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS_DIR, device_name  # noqa: E402
from solvers.memory import MemoryModel, find_lora_params, infer_blocks, measure_peak  # noqa: E402
from tests.nn.models import tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

TARGETS = {"tiny-bert": ["query", "value"], "tiny-llama": ["q_proj", "v_proj", "down_proj"],
           "tiny-gpt2": ["c_attn", "c_fc"], "minilm-l6": ["query", "value"]}


def build(name: str, batch: int, seq: int, device: str):
    import peft

    torch.manual_seed(0)
    if name == "minilm-l6":
        from fedkernels.assets import load_model

        model = load_model("minilm-l6", num_labels=5)[1]
    else:
        model = {"tiny-bert": tiny_bert, "tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[name](layers=4)
    model = model.eval().to(device)
    cfg = model.config
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS[name], lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    vocab = min(int(cfg.vocab_size), 1000)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -max(1, seq // 4):] = 0  # padded, as real batches are
    classify = name in ("tiny-bert", "minilm-l6")
    labels = torch.randint(0, int(cfg.num_labels), (batch,), generator=g) if classify else ids.clone()
    b = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    head = [p for n, p in pm.named_parameters() if ".classifier." in n]
    return pm, b, head, cfg, classify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(TARGETS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models.split(","):
        pm, b, head, cfg, classify = build(name, args.batch, args.seq, args.device)
        lora = find_lora_params(pm)
        names = list(lora)
        t0 = time.perf_counter()
        mm = MemoryModel.from_model(pm, b, lora, infer_blocks(lora), always_trainable=head)
        calib_s = time.perf_counter() - t0
        analytic = MemoryModel.from_config(cfg, batch_size=args.batch, seq_len=args.seq, rank=8,
                                           targets=TARGETS[name], task="classification" if classify else "causal-lm",
                                           dtype="float32", num_labels=int(cfg.num_labels), padded=True)
        for label, plan in (("1 module", names[-1:]), ("half", names[len(names) // 2:]), ("all", names)):
            m = measure_peak(pm, b, head + [p for n in plan for p in lora[n]])
            pred, ana = mm.predict(plan), analytic.predict(plan)
            rows.append({"model": name, "plan": label, "modules": len(plan), "predicted": pred,
                         "measured_peak": m.peak_bytes, "ratio": pred / m.peak_bytes,
                         "saved_count": m.total, "peak_over_saved_count": m.peak_bytes / m.total,
                         "analytic": ana, "analytic_over_calibrated": ana / pred,
                         "reserved": m.reserved_bytes, "calibration_s": calib_s})
    print("| model | plan | predicted peak | measured peak | ratio | peak / saved-tensor count | "
          "analytic / calibrated |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} ({r['modules']}) | {r['predicted'] / 2**20:.3f} MiB | "
              f"{r['measured_peak'] / 2**20:.3f} MiB | {r['ratio']:.4f} | {r['peak_over_saved_count']:.3f} | "
              f"{r['analytic_over_calibrated']:.3f} |")
    dev = device_name(args.device)
    out = RESULTS_DIR / f"{dev}-memory-peak-b{args.batch}s{args.seq}.json"
    out.write_text(json.dumps({"setting": vars(args), "device": dev, "machine": platform.platform(),
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
