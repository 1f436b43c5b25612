"""GPU tier: the Triton merge kernel at real shapes on CUDA (run by tests/ops/test_triton_tiers.py with a GPU)."""

from __future__ import annotations

import pytest
import torch

from fedkernels.ops import merge_stacked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 4096, 4096, 248), (3, 4096, 11008, 96), (2, 1000, 777, 5)])
def test_merge_triton_matches_float64(shape, dtype):
    M, out_f, in_f, S = shape
    dev = torch.device("cuda")
    W = torch.randn(M, out_f, in_f, device=dev, dtype=torch.float64) * 0.02
    A = torch.randn(M, S, in_f, device=dev, dtype=torch.float64) / in_f**0.5
    B = torch.randn(M, out_f, S, device=dev, dtype=torch.float64) * 0.02
    Wd, Ad, Bd = W.to(dtype), A.to(dtype), B.to(dtype)
    ref = Wd.double() + 0.5 * Bd.double() @ Ad.double()
    w = Wd.clone()
    merge_stacked(w, Ad, Bd, 0.5, backend="triton")
    # fp32 accumulation over S plus one rounding of the result to dtype
    bound = (S * torch.finfo(torch.float32).eps * (Bd.double().abs() @ Ad.double().abs())
             + torch.finfo(dtype).eps * ref.abs()).max()
    assert float((w.double() - ref).abs().max()) <= 2 * float(bound)
    assert torch.equal(w, merge_stacked(Wd.clone(), Ad, Bd, 0.5, backend="triton"))  # deterministic
