"""Triton masked LoRA linear on a real GPU at real shapes in bf16 (skipped without CUDA).

Run: FEDKERNELS_TIER=gpu pytest tests/ops/gpu. Same checks as the interpreter tier (error vs float64 at most
2x torch's own bf16 error), at kernels.md section 3 shapes and odd ones, through the GPU config table.
"""

import pytest
import torch

from fedkernels.ops import lora_linear
from fedkernels.ops import triton_lora as tk
from tests.ops._lora_checks import check_against_reference, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _mask(R, kind):
    if kind == "none":
        return None
    m = torch.zeros(R, device="cuda", dtype=torch.bfloat16)
    if kind == "prefix":
        m[: R // 2] = 1
    else:
        m[1::3] = 1
    return m


@pytest.mark.parametrize("T,fin,fout,R,kind", [
    (4096, 4096, 4096, 16, "none"),
    (1024, 2048, 2048, 64, "prefix"),
    (1000, 2050, 3001, 64, "scattered"),  # not multiples of any block
    (777, 1030, 515, 1, "none"),
])
def test_bf16_real_shapes(T, fin, fout, R, kind):
    inputs = make_inputs(T, fin, fout, R, torch.bfloat16, device="cuda")
    mask = _mask(R, kind)
    y = lora_linear(*inputs, 0.5, mask, backend="triton")
    g = torch.randn(y.shape, device="cuda").bfloat16()
    check_against_reference(y, inputs, 0.5, mask, g, label=f"gpu {T}x{fin}x{fout} R={R} {kind}")


def test_bf16_dropout_frozen_and_deterministic():
    p, seed = 0.1, 99
    inputs = make_inputs(2048, 2048, 1536, 16, torch.bfloat16, device="cuda")
    keep = tk.triton_dropout_keep_mask((2048, 2048), p, seed, "cuda")
    y = lora_linear(*inputs, 2.0, None, dropout_p=p, dropout_seed=seed, backend="triton")
    check_against_reference(y, inputs, 2.0, None, torch.randn(y.shape, device="cuda").bfloat16(), keep=keep,
                            label="gpu dropout")
    runs = [lora_linear(*inputs, 2.0, None, dropout_p=p, dropout_seed=seed, backend="triton") for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    frozen = make_inputs(2048, 2048, 1536, 16, torch.bfloat16, device="cuda", adapter_grad=False)
    yf = lora_linear(*frozen, 2.0, None, backend="triton")
    got = check_against_reference(yf, frozen, 2.0, None, torch.randn(yf.shape, device="cuda").bfloat16(),
                                  label="gpu frozen")
    assert set(got) == {"x"}


def test_auto_backend_picks_triton_on_cuda(monkeypatch):
    calls = []
    real = tk.lora_linear_triton
    monkeypatch.setattr(tk, "lora_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(64, 256, 128, 8, torch.bfloat16, device="cuda")
    lora_linear(*inputs, 1.0, None)
    assert calls == [1]
