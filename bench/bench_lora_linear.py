"""Masked LoRA linear, forward + backward, against its baselines in the same run (kernels.md section 3.1-3.2).

Candidates (each one training step of one layer: forward, then gradients of x and of the adapter):
- base:   frozen ``F.linear`` forward + dx backward (the floor: LoRA should cost almost nothing on top).
- ours:   ``fedkernels.ops.lora_linear`` with a rank mask at r_max, backend "auto": the Triton kernels on CUDA,
          the torch path on CPU.
- frozen: ours with the adapter frozen (dx only): should be ~base.
- nomask: ours without a rank mask (masking should be free: ours/nomask <= 1.03 on GPU).
- half_rank (GPU only): ours with a prefix mask of r/2 ones (rank loops stop at the active rank).
- peft:   ``peft.tuners.lora.Linear`` (dropout 0 in the timing, as ours).
Also the bytes autograd saves for backward with LoRA dropout 0.1 (ours regenerates its mask; peft keeps the
dropped copy of x and the mask).

GPU: shapes d in {2048, 4096}, r in {8, 16, 64}, T in {1024, 8192}, bf16, timed by triton's do_bench.
CPU (this dev box, no GPU): reduced shape T=2048, d=1024, r=16, fp32, round-robin medians, 1 thread
(BENCH_THREADS to change; see `bench._common.cpu_threads`).
Run: ``PYTHONPATH=$PWD python -m pytest -q bench/bench_lora_linear.py -s`` (``--benchmark-enable`` for
pytest-benchmark's own statistics of the "ours" step). Results: bench/results/<device>.json.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from bench._common import (
    bench_device,
    cpu_threads,
    cuda_median_ms,
    parse_cases,
    record,
    sample_interleaved,
    saved_activation_bytes,
)
from fedkernels.ops import lora_linear

DEVICE = bench_device()
if os.environ.get("BENCH_LORA_CASES"):  # e.g. "8192x4096x16xbfloat16,1024x2048x8xfloat32" (bench/gpu_check.py)
    CASES = parse_cases(os.environ["BENCH_LORA_CASES"])
elif DEVICE.type == "cuda":
    CASES = [(T, d, r, torch.bfloat16) for d in (2048, 4096) for r in (8, 16, 64) for T in (1024, 8192)]
else:
    CASES = [(2048, 1024, 16, torch.float32)]


def _peft_layer(base: torch.nn.Linear, r: int, alpha: float, dropout: float):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=dropout)
    # peft keeps fp32 adapters over a bf16 base by default; cast them so both layers run in the same dtype.
    layer.to(dtype=base.weight.dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    return layer


def _setup(T: int, d: int, r: int, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    x = rnd(T, d).requires_grad_()
    g = rnd(T, d)
    base = torch.nn.Linear(d, d, device=DEVICE, dtype=dtype)
    base.requires_grad_(False)
    A = rnd(r, d, scale=d**-0.5).requires_grad_()
    B = rnd(d, r, scale=r**-0.5).requires_grad_()
    mask = torch.ones(r, device=DEVICE, dtype=dtype)
    peft = _peft_layer(base, r, 2 * r, 0.0)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(A)
        peft.lora_B["default"].weight.copy_(B)
    peft_params = [peft.lora_A["default"].weight, peft.lora_B["default"].weight]
    scale = 2.0

    def base_step():
        y = F.linear(x, base.weight, base.bias)
        return torch.autograd.grad(y, [x], g)

    def ours_step():
        y = lora_linear(x, base.weight, base.bias, A, B, scale, mask)
        return torch.autograd.grad(y, [x, A, B], g)

    def nomask_step():
        y = lora_linear(x, base.weight, base.bias, A, B, scale, None)
        return torch.autograd.grad(y, [x, A, B], g)

    half = torch.zeros(r, device=DEVICE, dtype=dtype)
    half[: max(1, r // 2)] = 1

    def half_rank_step():  # active rank r/2 < r_max: rank loops stop at r/2
        y = lora_linear(x, base.weight, base.bias, A, B, scale, half)
        return torch.autograd.grad(y, [x, A, B], g)

    A_f, B_f = A.detach(), B.detach()

    def frozen_step():
        y = lora_linear(x, base.weight, base.bias, A_f, B_f, scale, mask)
        return torch.autograd.grad(y, [x], g)

    def peft_step():
        y = peft(x)
        return torch.autograd.grad(y, [x, *peft_params], g)

    steps = {"base": base_step, "ours": ours_step, "nomask": nomask_step, "frozen": frozen_step, "peft": peft_step}
    if DEVICE.type == "cuda":
        steps["half_rank"] = half_rank_step
    return steps, (x, base, A, B, mask, scale)


def _saved_bytes(x, base, A, B, mask, scale, r):
    params = [base.weight, base.bias, A, B, mask]
    ours, _ = saved_activation_bytes(
        lambda: lora_linear(x, base.weight, base.bias, A, B, scale, mask, dropout_p=0.1, dropout_seed=1), params)
    peft = _peft_layer(base, r, 2 * r, 0.1)
    peft.train()
    pp = [peft.lora_A["default"].weight, peft.lora_B["default"].weight]
    peft_bytes, _ = saved_activation_bytes(lambda: peft(x), [*params, *pp])
    return ours, peft_bytes


def _peak_bytes(step) -> int:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


@pytest.mark.parametrize("T,d,r,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_lora_linear_fwd_bwd(benchmark, T, d, r, dtype):
    steps, (x, base, A, B, mask, scale) = _setup(T, d, r, dtype)
    threads, fastest = None, None
    if DEVICE.type == "cuda":
        times = {k: cuda_median_ms(fn) / 1e3 for k, fn in steps.items()}
    else:
        threads, old = cpu_threads(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            samples = sample_interleaved(steps, device=DEVICE, rounds=15)
        finally:
            torch.set_num_threads(old)
        times = {k: statistics.median(v) for k, v in samples.items()}
        # min is the least disturbed by other jobs on the shared CPU; reported next to the medians.
        fastest = {k: round(min(v) * 1e3, 3) for k, v in samples.items()}
    ours_bytes, peft_bytes = _saved_bytes(x, base, A, B, mask, scale, r)
    peak = {k: _peak_bytes(steps[k]) for k in ("base", "ours", "peft")} if DEVICE.type == "cuda" else None
    torch.testing.assert_close(steps["ours"]()[0], steps["peft"]()[0], rtol=5e-2, atol=5e-2)  # same layer
    payload = {
        "shape": {"T": T, "d_in": d, "d_out": d, "r": r, "dtype": str(dtype).replace("torch.", "")},
        "backend": "triton" if DEVICE.type == "cuda" else "torch",
        "cpu_threads": threads,
        "timing": "triton do_bench median" if DEVICE.type == "cuda" else "round-robin median of 15",
        "ms": {k: round(v * 1e3, 3) for k, v in times.items()},
        "ms_min": fastest,
        "ratio_ours_over_base_min": round(fastest["ours"] / fastest["base"], 3) if fastest else None,
        "ratio_peft_over_ours_min": round(fastest["peft"] / fastest["ours"], 3) if fastest else None,
        "ratio_ours_over_base": round(times["ours"] / times["base"], 3),
        "ratio_frozen_over_base": round(times["frozen"] / times["base"], 3),
        "ratio_mask_over_nomask": round(times["ours"] / times["nomask"], 3),
        "ratio_peft_over_ours": round(times["peft"] / times["ours"], 3),
        "saved_bytes_dropout0.1": {"ours": ours_bytes, "peft": peft_bytes},
        "cuda_peak_bytes_above_inputs": peak,
        "command": "PYTHONPATH=$PWD python -m pytest -q bench/bench_lora_linear.py -s",
    }
    path = record(f"lora_linear/T{T}_d{d}_r{r}_{payload['shape']['dtype']}", payload)
    print(f"\n{payload['shape']} {payload['backend']}: ms {payload['ms']} ours/base {payload['ratio_ours_over_base']} "
          f"frozen/base {payload['ratio_frozen_over_base']} peft/ours {payload['ratio_peft_over_ours']} "
          f"(min-based ours/base {payload['ratio_ours_over_base_min']} "
          f"peft/ours {payload['ratio_peft_over_ours_min']}) "
          f"saved bytes ours {ours_bytes} peft {peft_bytes} -> {path.name}")
    assert ours_bytes < peft_bytes  # the regenerated dropout mask: no dropped copy of x, no stored mask
    benchmark.pedantic(steps["ours"], rounds=5 if DEVICE.type == "cpu" else 50, iterations=1)
