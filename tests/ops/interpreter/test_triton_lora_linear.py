"""Triton masked LoRA linear kernels under TRITON_INTERPRET=1, on tiny odd shapes, vs the float64 reference.

Run: FEDKERNELS_TIER=interpreter TRITON_INTERPRET=1 pytest tests/ops/interpreter (tests/ops/test_triton_tiers.py
does it in the normal suite). Blocks are 16 wide under the interpreter (INTERPRETER_CONFIG), so T=37, in=45,
out=29 cross every block edge and each launch is <= 12 programs.
"""

import os

import pytest
import torch

from fedkernels.nn import LoRALinear
from fedkernels.ops import lora_linear
from fedkernels.ops import triton_lora as tk
from tests.ops._lora_checks import check_against_reference, make_inputs

pytestmark = pytest.mark.interpreter
assert os.environ.get("TRITON_INTERPRET") == "1", "this tier must run with TRITON_INTERPRET=1"

T, FIN, FOUT = 37, 45, 29
DTYPES = [torch.float32, torch.float16]


def rank_mask(R: int, kind: str, dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    m = torch.zeros(R, dtype=dtype)
    if kind == "prefix":  # r_active < R (R=1: the full rank)
        m[: max(1, R // 3)] = 1
    elif kind == "scattered":  # non-prefix; for R=1 the all-zero mask (active rank 0)
        m[1::4] = 1
        if R > 1:
            m[R - 3] = 1
    return m


@pytest.fixture
def calls(monkeypatch):
    """Counts launches of each kernel wrapper, to check that frozen / no-grad paths skip their work."""
    counts = {"shrink": 0, "gemm": 0, "skinny": 0}
    for key, attr in (("shrink", "_shrink"), ("gemm", "_fused_gemm"), ("skinny", "_skinny_tn")):
        real = getattr(tk, attr)

        def wrapped(*a, _real=real, _key=key, **k):
            counts[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(tk, attr, wrapped)
    return counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [1, 16])
@pytest.mark.parametrize("kind", ["none", "prefix", "scattered"])
def test_forward_backward_vs_reference(dtype, R, kind):
    inputs = make_inputs(T, FIN, FOUT, R, dtype)
    mask = rank_mask(R, kind, dtype)
    y = lora_linear(*inputs, 0.7, mask, backend="triton")
    g = torch.randn(y.shape).to(dtype)
    got = check_against_reference(y, inputs, 0.7, mask, g, label=f"{dtype} R={R} {kind}")
    if mask is not None:
        off = mask == 0  # masked ranks get exactly zero gradient
        assert torch.all(got["A"][off] == 0) and torch.all(got["B"][:, off] == 0)


def test_bf16_interpreted_with_fp32_dot():
    # bf16 tl.dot is wrong in the interpreter (triton #11584); the kernels upcast there, so bf16 storage,
    # casts and the rank mask are still checked. Real bf16 tensor-core dots: compile and GPU tiers.
    inputs = make_inputs(T, FIN, FOUT, 16, torch.bfloat16)
    mask = rank_mask(16, "scattered", torch.bfloat16)
    y = lora_linear(*inputs, 0.5, mask, backend="triton")
    check_against_reference(y, inputs, 0.5, mask, torch.randn(y.shape).bfloat16(), label="bf16")


def test_rank_loop_several_steps_and_no_bias():
    # R=40: the fused GEMM's rank loop takes 3 steps of 16 and stops at the active rank 35.
    inputs = make_inputs(T, FIN, FOUT, 40, torch.float32, bias=False)
    mask = torch.zeros(40)
    mask[[0, 5, 17, 20, 34]] = 1
    y = lora_linear(*inputs, 1.3, mask, backend="triton")
    check_against_reference(y, inputs, 1.3, mask, torch.randn(y.shape), label="R=40")


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_adapter_skips_dA_dB(dtype, calls):
    inputs = make_inputs(T, FIN, FOUT, 16, dtype, adapter_grad=False)
    mask = rank_mask(16, "prefix", dtype)
    y = lora_linear(*inputs, 0.7, mask, backend="triton")
    assert calls == {"shrink": 1, "gemm": 1, "skinny": 0}
    got = check_against_reference(y, inputs, 0.7, mask, torch.randn(y.shape).to(dtype), label="frozen")
    assert set(got) == {"x"}
    assert calls == {"shrink": 2, "gemm": 2, "skinny": 0}  # backward: gh shrink + dx GEMM, no dA/dB


@pytest.mark.parametrize("dtype", DTYPES)
def test_x_without_grad_skips_dx(dtype, calls):
    inputs = make_inputs(T, FIN, FOUT, 16, dtype, x_grad=False)
    y = lora_linear(*inputs, 0.7, None, backend="triton")
    got = check_against_reference(y, inputs, 0.7, None, torch.randn(y.shape).to(dtype), label="no dx")
    assert set(got) == {"A", "B"}
    assert calls == {"shrink": 2, "gemm": 1, "skinny": 2}  # one GEMM only: the forward


def test_frozen_and_no_x_grad_needs_nothing_saved():
    inputs = make_inputs(T, FIN, FOUT, 16, torch.float32, x_grad=False, adapter_grad=False)
    y = lora_linear(*inputs, 0.7, None, backend="triton")
    assert not y.requires_grad
    y64 = lora_linear(*(None if t is None else t.double() for t in inputs), 0.7, None, backend="torch")
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_saves_only_x_and_rank_sized_h():
    inputs = make_inputs(T, FIN, FOUT, 16, torch.float32)
    y = lora_linear(*inputs, 0.7, None, dropout_p=0.2, dropout_seed=5, backend="triton")
    fn = y.grad_fn if hasattr(y.grad_fn, "saved_tensors") else y.grad_fn.next_functions[0][0]
    saved = [t for t in fn.saved_tensors if t is not None]
    params = {id(t) for t in inputs[1:] if t is not None}
    activations = [t for t in saved if id(t) not in params and t.numel() > 1]
    x_like = [t for t in activations if t.shape == (T, FIN)]
    others = [t for t in activations if t.shape != (T, FIN)]
    assert len(x_like) == 1 and x_like[0].data_ptr() == inputs[0].data_ptr()  # x itself, no dropped copy
    assert [tuple(t.shape) for t in others] == [(T, 16)]  # h only; no dropout mask, no [T, out] tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_forward_backward_consistent(dtype):
    p, seed = 0.3, 1234
    inputs = make_inputs(T, FIN, FOUT, 16, dtype)
    mask = rank_mask(16, "scattered", dtype)
    keep = tk.triton_dropout_keep_mask((T, FIN), p, seed, "cpu")
    frac = (keep == 0).float().mean().item()
    assert 0.15 < frac < 0.45, f"dropped fraction {frac} far from p={p}"
    assert torch.allclose(keep[keep != 0], torch.tensor(1 / (1 - p)))
    y = lora_linear(*inputs, 0.9, mask, dropout_p=p, dropout_seed=seed, backend="triton")
    # The same keep-mask, applied explicitly in the reference, must explain y, dx, dA and dB.
    check_against_reference(y, inputs, 0.9, mask, torch.randn(y.shape).to(dtype), keep=keep, label="dropout")
    y2 = lora_linear(*inputs, 0.9, mask, dropout_p=p, dropout_seed=seed, backend="triton")
    assert torch.equal(y, y2)
    y3 = lora_linear(*inputs, 0.9, mask, dropout_p=p, dropout_seed=seed + 1, backend="triton")
    assert not torch.equal(y, y3)


def test_leading_dims_and_transposed_weight_view():
    x, w, b, A, B = make_inputs(2 * 19, FIN, FOUT, 16, torch.float32)
    x3 = x.detach().reshape(2, 19, FIN).requires_grad_()
    w_t = w.t().contiguous().t()  # GPT-2 Conv1D style: a transposed view, not contiguous
    assert not w_t.is_contiguous()
    y = lora_linear(x3, w_t, b, A, B, 0.7, None, backend="triton")
    assert y.shape == (2, 19, FOUT)
    y.backward(torch.ones_like(y))
    y_ref = lora_linear(x3.detach().double(), w.double(), b.double(), A.detach().double(), B.detach().double(),
                        0.7, None, backend="torch")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert x3.grad.shape == x3.shape and A.grad.shape == A.shape


def test_lora_module_triton_matches_torch_backend():
    torch.manual_seed(3)
    layer = LoRALinear(torch.nn.Linear(FIN, FOUT), r=16, alpha=32, backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the adapter path visible
    layer.set_active_rank(5)
    x = torch.randn(T, FIN)
    y = layer(x)
    y.sum().backward()
    grads = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()
    layer.backend = "torch"
    y_t = layer(x)
    y_t.sum().backward()
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], layer.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], layer.lora_B.grad, rtol=1e-4, atol=1e-5)


def test_empty_batch():
    x, w, b, A, B = make_inputs(0, FIN, FOUT, 16, torch.float32)
    y = lora_linear(x, w, b, A, B, 0.7, None, backend="triton")
    assert y.shape == (0, FOUT)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_trainable_base_weight_and_bias_grads():
    x, w, b, A, B = make_inputs(T, FIN, FOUT, 16, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    mask = rank_mask(16, "scattered", torch.float32)
    y = lora_linear(x, w, b, A, B, 0.7, mask, backend="triton")
    g = torch.randn(y.shape)
    got = torch.autograd.grad(y, (x, w, b, A, B), g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    y64 = lora_linear(*leaves, 0.7, mask.double(), backend="torch")
    ref = torch.autograd.grad(y64, leaves, g.double())
    for name, a, r in zip(("x", "W", "b", "A", "B"), got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_deterministic_across_runs():
    # No atomics anywhere: split-T partials are summed in a fixed order, so reruns are bitwise equal.
    inputs = make_inputs(T, FIN, FOUT, 16, torch.float16)
    mask = rank_mask(16, "scattered", torch.float16)
    g = torch.randn(T, FOUT).half()
    runs = []
    for _ in range(3):
        y = lora_linear(*inputs, 0.7, mask, dropout_p=0.1, dropout_seed=3, backend="triton")
        runs.append((y, *torch.autograd.grad(y, (inputs[0], inputs[3], inputs[4]), g)))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_opt_in_autotune_picks_fastest_candidate_and_caches(monkeypatch):
    monkeypatch.setenv("FEDKERNELS_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tk, "_TUNED", {})
    launched, timed = [], []
    real_launch = tk._launch_fused_gemm

    def launch(*args):
        launched.append(args[-1])
        return real_launch(*args)

    def fake_ms(fn):
        fn()
        timed.append(launched[-1])
        return 1.0 if launched[-1].gemm_m == 32 else 2.0  # pretend the 32x32 tile is faster

    monkeypatch.setattr(tk, "_launch_fused_gemm", launch)
    monkeypatch.setattr(tk, "_bench_ms", fake_ms)
    inputs = make_inputs(T, FIN, FOUT, 16, torch.float32)
    y = lora_linear(*inputs, 0.7, None, backend="triton")
    assert [c.gemm_m for c in timed] == [16, 32]  # both candidates timed once, on the forward GEMM
    assert launched[-1].gemm_m == 32 and all(c.gemm_m == 32 for c in tk._TUNED.values())
    check_against_reference(y, inputs, 0.7, None, torch.randn(y.shape), label="autotuned")
    assert len(timed) == 4  # backward dx GEMM: a new key (N=in, K=out), tuned once
    lora_linear(*inputs, 0.7, None, backend="triton")
    assert len(timed) == 4  # cached: no re-timing
