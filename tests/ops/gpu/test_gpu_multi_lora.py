"""Multi-client LoRA Triton kernels on a real GPU at real shapes in bf16 (skipped without CUDA).

Run: FEDKERNELS_TIER=gpu python -m pytest tests/ops/gpu/test_gpu_multi_lora.py
Tolerance as the interpreter tier: the kernel's error vs a float64 reference is at most 2x the torch
path's error in the same dtype plus a few bf16 ulps of the output's magnitude.
"""

import pytest
import torch

if not torch.cuda.is_available():  # pragma: no cover - the tier runs only where CUDA is
    pytest.skip("GPU tier needs CUDA", allow_module_level=True)

from fedkernels.ops import build_meta, multi_lora_linear  # noqa: E402
from fedkernels.reference import multi_lora_linear_ref  # noqa: E402

DEV = "cuda"


def make(T, d, K, R, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, d, device=DEV, generator=g).to(dtype)
    w = (torch.randn(d, d, device=DEV, generator=g) / d**0.5).to(dtype)
    b = torch.randn(d, device=DEV, generator=g).to(dtype)
    A = (torch.randn(K, R, d, device=DEV, generator=g) / d**0.5).to(dtype)
    B = (torch.randn(K, d, R, device=DEV, generator=g) / R**0.5).to(dtype)
    return x, w, b, A, B


def mixes(T, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, K, (T,), generator=g)
    p = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) ** 1.5  # zipf 1.5 as punica's bench
    skewed = torch.multinomial(p / p.sum(), T, replacement=True, generator=g)
    with_none = uniform.clone()
    with_none[::5] = -1
    return {"uniform": uniform, "skewed": skewed, "with_none": with_none}


def run(backend, x, w, b, A, B, scales, ranks, meta, det=False):
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    if backend == "ref":
        xs, As, Bs = (t.detach().double().requires_grad_() for t in (xs, As, Bs))
        ids = torch.full((x.shape[0],), -1, device=DEV, dtype=torch.int64)
        ids[meta.perm] = torch.repeat_interleave(torch.arange(meta.num_clients, device=DEV), meta.counts)
        y = multi_lora_linear_ref(xs, w.double(), b.double(), As, Bs, scales.double(),
                                  torch.tensor(ranks), ids)
    else:
        y = multi_lora_linear(xs, w, b, As, Bs, scales, ranks, meta, backend=backend, deterministic=det)
    gy = torch.randn(y.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(7)).to(y.dtype)
    grads = torch.autograd.grad(y, (xs, As, Bs), gy)
    return {"y": y.detach(), "x": grads[0], "A": grads[1], "B": grads[2]}


@pytest.mark.parametrize("mix", ["uniform", "skewed", "with_none"])
@pytest.mark.parametrize("K,R", [(8, 16), (4, 64)])
def test_bf16_real_shapes(mix, K, R):
    T, d = 2048, 1024
    x, w, b, A, B = make(T, d, K, R, torch.bfloat16)
    scales = torch.rand(K) + 0.5
    ranks = [R if c % 2 == 0 else max(1, R // 4) for c in range(K)]
    meta = build_meta(mixes(T, K)[mix].to(DEV), K)
    ref = run("ref", x, w, b, A, B, scales, ranks, meta)
    got_t = run("torch", x, w, b, A, B, scales, ranks, meta)
    got_k = run("triton", x, w, b, A, B, scales, ranks, meta)
    for name, r in ref.items():
        e_t = (got_t[name].double() - r).abs().max().item()
        e_k = (got_k[name].double() - r).abs().max().item()
        floor = 4 * torch.finfo(torch.bfloat16).eps * max(1.0, r.abs().max().item())
        assert e_k <= 2 * e_t + floor, f"{name}: triton {e_k:.3g} vs torch {e_t:.3g}"


def test_deterministic_bitwise_on_gpu():
    T, d, K, R = 4096, 1024, 8, 16
    x, w, b, A, B = make(T, d, K, R, torch.bfloat16, seed=3)
    meta = build_meta(mixes(T, K)["skewed"].to(DEV), K)
    scales, ranks = torch.rand(K) + 0.5, [16] * K
    first = run("triton", x, w, b, A, B, scales, ranks, meta, det=True)
    for _ in range(19):
        again = run("triton", x, w, b, A, B, scales, ranks, meta, det=True)
        for name in first:
            assert torch.equal(first[name], again[name]), name
