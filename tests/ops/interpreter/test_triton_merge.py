"""Triton merge kernel under TRITON_INTERPRET=1 (run by tests/ops/test_triton_tiers.py in its own process).

Tiny odd shapes (out, in not multiples of the 64 tiles, S not a multiple of BLOCK_K, S < 16) keep the number of
programs <= 8 (the interpreter runs ~30-65 ms per program, kernels.md sec. 4)."""

from __future__ import annotations

import os

import pytest
import torch

from fedkernels.ops import merge_stacked

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tier")

SHAPES = [(1, 37, 45, 7), (2, 70, 19, 33), (3, 5, 66, 3)]  # (M, out, in, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_merge_matches_float64(shape, dtype):
    M, out_f, in_f, S = shape
    W = torch.randn(M, out_f, in_f, dtype=torch.float64)
    A = torch.randn(M, S, in_f, dtype=torch.float64) / S**0.5
    B = torch.randn(M, out_f, S, dtype=torch.float64)
    scale = 0.625
    # reference from the rounded inputs, so only the kernel's own rounding is measured
    Wd, Ad, Bd = W.to(dtype), A.to(dtype), B.to(dtype)
    ref = Wd.double() + scale * Bd.double() @ Ad.double()
    w = Wd.clone()
    ptr = w.data_ptr()
    out = merge_stacked(w, Ad, Bd, scale, backend="triton")
    assert out.data_ptr() == ptr
    eps = torch.finfo(dtype).eps
    # fp32 accumulation of S products (error ~ S * eps32 * |B||A|) + one rounding of the result to dtype
    bound = (S * torch.finfo(torch.float32).eps * (Bd.double().abs() @ Ad.double().abs()) + eps * ref.abs()).max()
    err = (w.double() - ref).abs().max()
    assert float(err) <= 2 * float(bound), (float(err), float(bound))
    # and it really did something: the update is far above the tolerance
    assert float((w.double() - Wd.double()).abs().max()) > 100 * float(bound)


def test_merge_matches_torch_backend_and_strided_weight():
    M, out_f, in_f, S = 2, 33, 40, 18
    base = torch.randn(M, in_f, out_f)
    w_t = base.clone().transpose(1, 2)  # non-contiguous [M, out, in] view
    w_ref = w_t.contiguous()
    A = torch.randn(M, S, in_f)
    B = torch.randn(M, out_f, S)
    merge_stacked(w_t, A, B, 1.5, backend="triton")
    merge_stacked(w_ref, A, B, 1.5, backend="torch")
    torch.testing.assert_close(w_t, w_ref, rtol=1e-5, atol=1e-5)
