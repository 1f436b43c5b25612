"""fwd+bwd time of our LoRALinear vs peft's lora.Linear with LoRA dropout 0 and 0.1 (CPU, torch path).

Setting: T=2048, in=out=1024, r=16, fp32, 1 thread, median of 10 alternating steps.
Run: ``PYTHONPATH=$PWD python bench/lora_dropout_time.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.bench_lora_linear import _peft_layer
from fedkernels.nn import LoRALinear

T, D, R = 2048, 1024, 16


def _step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    layer(x).backward(g)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = torch.nn.Linear(D, D)
    for p_drop in (0.0, 0.1):
        ours = LoRALinear(torch.nn.Linear(D, D), r=R, alpha=2 * R, dropout=p_drop)
        ours.base_layer.load_state_dict(base.state_dict())
        for p in ours.base_layer.parameters():
            p.requires_grad_(False)
        torch.nn.init.normal_(ours.lora_B)
        peft_base = torch.nn.Linear(D, D)
        peft_base.load_state_dict(base.state_dict())
        peft = _peft_layer(peft_base, R, 2 * R, p_drop)
        ours.train()
        peft.train()
        x = torch.randn(T, D, requires_grad=True)
        g = torch.randn(T, D)
        times: dict[str, list[float]] = {"ours": [], "peft": []}
        for layer in (ours, peft):  # warm-up
            _step(layer, x, g)
        for _ in range(10):
            for name, layer in (("ours", ours), ("peft", peft)):
                t0 = time.perf_counter()
                _step(layer, x, g)
                times[name].append(time.perf_counter() - t0)
        ms_ours = statistics.median(times["ours"]) * 1e3
        ms_peft = statistics.median(times["peft"]) * 1e3
        print(f"dropout={p_drop}: ours {ms_ours:.1f} ms, peft {ms_peft:.1f} ms, peft/ours {ms_peft / ms_ours:.2f}")


if __name__ == "__main__":
    main()
