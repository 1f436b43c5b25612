"""`fedkernels.ops.lora_linear` (torch path) against the float64 reference."""

import os

import pytest
import torch

from fedkernels.errors import BackendError, ShapeError
from fedkernels.ops import dropout_keep_mask, lora_linear
from fedkernels.reference import lora_linear_ref

SHAPES = [(3, 37, 53), (1, 5, 7), (17, 64, 33)]  # (T, in, out): odd on purpose


def make(T, fin, fout, R, dtype, *, bias=True):
    x = torch.randn(T, fin, dtype=dtype, requires_grad=True)
    w = torch.randn(fout, fin, dtype=dtype) / fin**0.5
    b = torch.randn(fout, dtype=dtype) if bias else None
    A = (torch.randn(R, fin, dtype=dtype) / fin**0.5).requires_grad_()
    B = torch.randn(fout, R, dtype=dtype).requires_grad_()  # never zeros: B=0 would hide dA bugs
    return x, w, b, A, B


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def masks(R):
    yield None
    if R > 1:
        m = torch.zeros(R)
        m[: R // 2] = 1
        yield m  # partial prefix
        m = torch.zeros(R)
        m[1::3] = 1
        yield m  # non-prefix


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("R", [1, 8, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_matches_reference(shape, R, dtype, tol):
    T, fin, fout = shape
    for mask in masks(R):
        x, w, b, A, B = make(T, fin, fout, R, dtype)
        y = lora_linear(x, w, b, A, B, 0.7, mask, backend="torch")
        # reference in float64 on the same data
        x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
        m64 = None if mask is None else mask.double()
        y_ref = lora_linear_ref(x64, w.double(), b.double(), A64, B64, 0.7, m64)
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
        got = grads(y, (x, A, B))
        ref = grads(y_ref, (x64, A64, B64))
        for name, g, r in zip("xAB", got, ref, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=f"grad {name} mask={mask}")
        if mask is not None:
            # masked ranks get exactly zero gradient
            off = mask == 0
            assert torch.all(got[1][off] == 0) and torch.all(got[2][:, off] == 0)


def test_gradcheck_float64():
    x, w, b, A, B = make(4, 6, 5, 3, torch.float64)
    b.requires_grad_()
    m = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    f = lambda *t: lora_linear(*t, 1.3, m, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w.requires_grad_(), b, A, B))


def test_gradcheck_with_dropout():
    x, w, b, A, B = make(4, 6, 5, 3, torch.float64)
    f = lambda x, A, B: lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, dropout_seed=123, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_dropout_matches_explicit_mask():
    x, w, b, A, B = make(9, 13, 11, 4, torch.float64)
    y = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.25, dropout_seed=7, backend="torch")
    keep = dropout_keep_mask(x.shape, 0.25, 7, x.device, x.dtype)
    assert 0 < (keep == 0).sum() < keep.numel()  # the mask really drops something
    y_ref = torch.nn.functional.linear(x, w, b) + 0.5 * ((x * keep) @ A.T) @ B.T
    torch.testing.assert_close(y, y_ref)
    got = grads(y, (x, A, B))
    ref = grads(y_ref, (x, A, B))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_frozen_adapter_and_x_without_grad_compute_nothing_extra():
    x, w, b, A, B = make(5, 7, 9, 4, torch.float32)
    A.requires_grad_(False)
    B.requires_grad_(False)
    y = lora_linear(x, w, b, A, B, 2.0, backend="torch")
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(5, 9) @ w + 2.0 * (torch.ones(5, 9) @ B) @ A)
    # x without grad: only A and B get gradients
    x2 = x.detach()
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = lora_linear(x2, w, b, A, B, 2.0, backend="torch")
    dA, dB = torch.autograd.grad(y.sum(), (A, B))
    assert dA.shape == A.shape and dB.shape == B.shape


def test_saved_tensors_are_rank_sized():
    """Only x and the [T, R] h are saved (parameters excluded); with dropout no mask and no dropped x."""
    x, w, b, A, B = make(32, 40, 24, 4, torch.float32)
    param_ptrs = {t.untyped_storage().data_ptr() for t in (w, b, A, B)}
    for p in (0.0, 0.1):
        saved = {}

        def pack(t, saved=saved):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_linear(x, w, b, A, B, 1.0, dropout_p=p, dropout_seed=1, backend="torch")
        assert sum(saved.values()) == (32 * 40 + 32 * 4) * 4, (p, saved)


def test_leading_dims_and_errors():
    x = torch.randn(2, 3, 8)
    w, A, B = torch.randn(5, 8), torch.randn(4, 8), torch.randn(5, 4)
    assert lora_linear(x, w, None, A, B, 1.0, backend="torch").shape == (2, 3, 5)
    with pytest.raises(ShapeError, match=r"lora_B must be \[5, 4\]"):
        lora_linear(x, w, None, A, B.T, 1.0)
    with pytest.raises(ShapeError, match="9 features"):
        lora_linear(torch.randn(3, 9), w, None, A, B, 1.0)
    with pytest.raises(ShapeError, match="rank_mask"):
        lora_linear(x, w, None, A, B, 1.0, torch.ones(3))
    with pytest.raises(BackendError, match="'cuda-magic'"):
        lora_linear(x, w, None, A, B, 1.0, backend="cuda-magic")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, None, A, B, 1.0, dropout_p=1.0)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    x, w, b, A, B = make(3, 5, 4, 2, torch.float32)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set: CPU tensors are allowed on the triton backend")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        lora_linear(x, w, b, A, B, 0.5, backend="triton")
