"""Shared checks of the masked LoRA linear kernels (interpreter and GPU tiers).

Tolerances are tied to rounding noise: a kernel's error against the float64 reference may be at most
``factor`` (2) times the error of torch's own computation in the same dtype on the same data, where torch's
error is taken as at least one unit of roundoff of the output's magnitude (so an exactly-representable
torch result does not demand an exact kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_rounding_close(name: str, got: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                          *, factor: float = 2.0, atol: float = 1e-6) -> None:
    """max|got - ref64| <= factor * max(max|same_dtype - ref64|, eps * max|ref64|) + atol."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (same_dtype.double() - ref64).abs().max().item() if got.numel() else 0.0
    ulp = EPS[got.dtype] * (ref64.abs().max().item() if got.numel() else 0.0)
    bound = factor * max(err_torch, ulp) + atol
    assert err <= bound, f"{name}: kernel error {err:.3e} > {bound:.3e} (torch {got.dtype} error {err_torch:.3e})"


def make_inputs(T: int, fin: int, fout: int, R: int, dtype: torch.dtype, *, bias: bool = True,
                x_grad: bool = True, adapter_grad: bool = True, device: str = "cpu"):
    """Random layer data (never zeros: B = 0 would hide dA bugs), scaled so outputs are O(1)."""
    x = torch.randn(T, fin, device=device).to(dtype).requires_grad_(x_grad)
    w = (torch.randn(fout, fin, device=device) / fin**0.5).to(dtype)
    b = torch.randn(fout, device=device).to(dtype) if bias else None
    A = (torch.randn(R, fin, device=device) / fin**0.5).to(dtype).requires_grad_(adapter_grad)
    B = (torch.randn(fout, R, device=device) / max(R, 1) ** 0.5).to(dtype).requires_grad_(adapter_grad)
    return x, w, b, A, B


def lora_forward(x, w, b, A, B, scale, mask, keep=None):
    """Reference formula in the inputs' own dtype (autograd gives the gradients); keep = dropout mask."""
    d = x * keep.to(x.dtype) if keep is not None else x
    h = d @ A.T
    if mask is not None:
        h = h * mask.to(h.dtype)
    return F.linear(x, w, b) + scale * (h @ B.T)


def check_against_reference(y, inputs, scale, mask, g, *, keep=None, label=""):
    """Compare y and the gradients of ``inputs = (x, w, b, A, B)`` (those that require grad) with float64
    and with torch's same-dtype computation. ``y`` must come from the kernel with ``inputs``."""
    x, w, b, A, B = inputs
    names = ("x", "A", "B")
    wants = [t for t in (x, A, B) if t.requires_grad]
    got_grads = torch.autograd.grad(y, wants, g) if wants else ()

    def run(dtype):
        xs = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x, A, B)]
        out = lora_forward(xs[0], w.to(dtype), None if b is None else b.to(dtype), xs[1], xs[2], scale,
                           None if mask is None else mask.to(dtype), keep)
        want = [t for t in xs if t.requires_grad]
        return out, (torch.autograd.grad(out, want, g.to(dtype)) if want else ())

    y64, g64 = run(torch.float64)
    yt, gt = run(x.dtype)
    assert_rounding_close(f"{label} y", y, yt, y64)
    wanted_names = [n for n, t in zip(names, (x, A, B), strict=True) if t.requires_grad]
    for n, a, t, r in zip(wanted_names, got_grads, gt, g64, strict=True):
        assert_rounding_close(f"{label} d{n}", a, t, r)
    return dict(zip(wanted_names, got_grads, strict=True))
