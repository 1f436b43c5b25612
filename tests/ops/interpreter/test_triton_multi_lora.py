"""Triton multi-client LoRA kernels under TRITON_INTERPRET=1 against the float64 reference.

Run: FEDKERNELS_TIER=interpreter TRITON_INTERPRET=1 python -m pytest tests/ops/interpreter/test_triton_multi_lora.py
Tolerance: the kernel's max error vs float64 must be at most 2x the torch path's error in the same dtype,
plus a floor of a few units in the last place of the output's magnitude (both paths can be exact-ish).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - collected only in the interpreter tier
    pytest.skip("interpreter tier needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from fedkernels.ops import build_meta, multi_lora_linear  # noqa: E402
from fedkernels.ops import triton_multi_lora as tm  # noqa: E402
from fedkernels.reference import multi_lora_linear_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def make(T, fin, fout, K, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, fin, generator=g).to(dtype)
    w = (torch.randn(fout, fin, generator=g) / fin**0.5).to(dtype)
    b = torch.randn(fout, generator=g).to(dtype)
    A = (torch.randn(K, R, fin, generator=g) / fin**0.5).to(dtype)
    B = (torch.randn(K, fout, R, generator=g) / R**0.5).to(dtype)  # never zeros
    scales = torch.rand(K, generator=g) + 0.5
    return x, w, b, A, B, scales


def ids_for(rule, T, K, seed=2):
    g = torch.Generator().manual_seed(seed)
    if rule == "all_none":
        return torch.full((T,), -1)
    ids = torch.randint(-1, K, (T,), generator=g)
    if rule == "zero_client":
        ids[ids == 1] = 0  # client 1 gets no token
    return ids


def run(backend, x, w, b, A, B, scales, ranks, ids, *, x_grad=True, trainable=None, det=False, seed=1):
    xs = x.clone().requires_grad_(x_grad)
    As, Bs = A.clone().requires_grad_(), B.clone().requires_grad_()
    if backend == "ref":
        xs, As, Bs = (t.detach().double().requires_grad_(t.requires_grad) for t in (xs, As, Bs))
        y = multi_lora_linear_ref(xs, w.double(), b.double(), As, Bs, scales.double(), torch.tensor(ranks), ids)
    else:
        y = multi_lora_linear(xs, w, b, As, Bs, scales, ranks, ids, backend=backend, deterministic=det,
                              trainable=trainable)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    inputs = [t for t in (xs, As, Bs) if t.requires_grad]
    grads = torch.autograd.grad(y, inputs, gy, allow_unused=True)
    out = {"y": y.detach()}
    for name, t, gr in zip(("x", "A", "B") if x_grad else ("A", "B"), inputs, grads, strict=True):
        out[name] = torch.zeros_like(t) if gr is None else gr
    return out


def ulp_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    return 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def check(dtype, ref, got_torch, got_tri, *, frozen=(), ranks=None):
    for name, r in ref.items():
        e_torch = (got_torch[name].double() - r).abs().max().item()
        e_tri = (got_tri[name].double() - r).abs().max().item()
        assert e_tri <= 2 * e_torch + ulp_floor(r, dtype), f"{name}: triton err {e_tri:.3g} vs torch {e_torch:.3g}"
    for c in frozen:
        assert torch.all(got_tri["A"][c] == 0) and torch.all(got_tri["B"][c] == 0)
    if ranks is not None:
        for c, rc in enumerate(ranks):
            assert torch.all(got_tri["A"][c, rc:] == 0) and torch.all(got_tri["B"][c, :, rc:] == 0)


CASES = [  # (T, in, out, K, R, ranks, rule): odd shapes, never multiples of the 16-wide tiles
    (37, 45, 29, 4, 16, [16, 5, 1, 9], "random"),
    (23, 19, 33, 3, 1, [1, 0, 1], "random"),  # R = 1, a client with rank 0
    (41, 35, 18, 4, 16, [3, 16, 7, 16], "zero_client"),
    (13, 17, 21, 2, 16, [16, 4], "all_none"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference(case, dtype):
    T, fin, fout, K, R, ranks, rule = case
    x, w, b, A, B, scales = make(T, fin, fout, K, R, dtype)
    ids = ids_for(rule, T, K)
    ref = run("ref", x, w, b, A, B, scales, ranks, ids)
    got_torch = run("torch", x, w, b, A, B, scales, ranks, ids)
    got_tri = run("triton", x, w, b, A, B, scales, ranks, ids)
    check(dtype, ref, got_torch, got_tri, ranks=ranks)
    got_det = run("triton", x, w, b, A, B, scales, ranks, ids, det=True)
    check(dtype, ref, got_torch, got_det, ranks=ranks)
    if rule == "all_none":
        assert torch.equal(got_tri["y"], torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_clients_and_x_without_grad(dtype):
    T, fin, fout, K, R = 33, 26, 19, 3, 16
    ranks, trainable = [16, 6, 11], [True, False, True]
    x, w, b, A, B, scales = make(T, fin, fout, K, R, dtype, seed=3)
    ids = ids_for("random", T, K, seed=4)
    ref = run("ref", x, w, b, A, B, scales, ranks, ids)
    ref["A"][1] = 0
    ref["B"][1] = 0  # a frozen client's gradient is defined as zero
    got_torch = run("torch", x, w, b, A, B, scales, ranks, ids, trainable=trainable)
    got_tri = run("triton", x, w, b, A, B, scales, ranks, ids, trainable=trainable)
    check(dtype, ref, got_torch, got_tri, frozen=[1], ranks=ranks)
    # x needs no grad: only the adapter gradients are produced (no dx expand launch)
    ref_nx = {k: v for k, v in ref.items() if k != "x"}
    got_nx = run("triton", x, w, b, A, B, scales, ranks, ids, x_grad=False, trainable=trainable)
    torch_nx = run("torch", x, w, b, A, B, scales, ranks, ids, x_grad=False, trainable=trainable)
    check(dtype, ref_nx, torch_nx, got_nx, frozen=[1], ranks=ranks)


def test_split_paths_are_exercised_and_agree():
    """The determinism test below must hit the split-K / split-T paths, or it proves nothing."""
    T, fin, fout, K, R = 64, 48, 40, 2, 16
    x, w, b, A, B, scales = make(T, fin, fout, K, R, torch.float32, seed=5)
    ids = ids_for("random", T, K, seed=6)
    meta = build_meta(ids, K)
    cfg = tm.INTERPRETER_CONFIG
    segs = tm._segments(meta, lambda c: True)
    m_tiles = -(-segs.max_len // cfg.shrink_m)
    assert tm._split(cfg.shrink_split, m_tiles * K, -(-fin // cfg.shrink_k), x.device) > 1
    n_tiles = -(-fin // cfg.grad_n)
    assert tm._split(cfg.grad_split, n_tiles * K, -(-segs.max_len // cfg.grad_t), x.device) > 1
    ranks_t = torch.tensor([16, 9], dtype=torch.int32)
    sa = A.stride()
    h_atomic = tm.shrink(x, A, sa, meta, segs, ranks_t, None, R, cfg, deterministic=False)
    h_det = tm.shrink(x, A, sa, meta, segs, ranks_t, None, R, cfg, deterministic=True)
    xs = x.double()[meta.perm]
    for c in range(K):
        lo, hi = meta.segment(c)
        r = int(ranks_t[c])
        h_ref = xs[lo:hi] @ A[c, :r].double().T
        for h in (h_atomic, h_det):
            torch.testing.assert_close(h[lo:hi, :r].double(), h_ref, rtol=1e-5, atol=1e-5)
            assert torch.all(h[lo:hi, r:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_mode_is_bitwise_reproducible(dtype):
    T, fin, fout, K, R = 64, 48, 40, 2, 16
    ranks = [16, 9]
    x, w, b, A, B, scales = make(T, fin, fout, K, R, dtype, seed=5)
    ids = ids_for("random", T, K, seed=6)
    meta = build_meta(ids, K)
    first = run("triton", x, w, b, A, B, scales, ranks, meta, det=True)
    for _ in range(19):
        again = run("triton", x, w, b, A, B, scales, ranks, meta, det=True)
        for name, v in first.items():
            assert torch.equal(again[name], v), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_and_grad_kernels_directly(dtype):
    """The expand and adapter-gradient kernels alone, on a layout with a -1 token and a rank-0 client."""
    T, fin, fout, K, R = 29, 21, 35, 3, 16
    x, w, b, A, B, scales = make(T, fin, fout, K, R, dtype, seed=8)
    ids = ids_for("random", T, K, seed=9)
    meta = build_meta(ids, K)
    cfg = tm.INTERPRETER_CONFIG
    ranks = [16, 0, 7]
    segs = tm._segments(meta, lambda c: ranks[c] > 0)
    ranks_t = torch.tensor(ranks, dtype=torch.int32)
    scales_t = scales.float()
    g = torch.Generator().manual_seed(10)
    p = torch.randn(meta.num_lora_tokens, R, generator=g)  # a rank-sized fp32 intermediate, sorted rows
    y = torch.randn(T, fout, generator=g).to(dtype)
    y_k = y.clone()
    sb = B.stride()
    tm.expand(p, B, sb, y_k, meta, segs, ranks_t, scales_t, R, cfg)
    y_ref, y_torch = y.double().clone(), y.clone()
    for c in segs.clients:
        lo, hi = meta.segment(c)
        rows, r = meta.perm[lo:hi], ranks[c]
        y_ref[rows] += float(scales_t[c]) * p[lo:hi, :r].double() @ B[c, :, :r].double().T
        y_torch[rows] += (float(scales_t[c]) * p[lo:hi, :r].to(dtype) @ B[c, :, :r].T).to(dtype)
    e_k, e_t = (y_k.double() - y_ref).abs().max().item(), (y_torch.double() - y_ref).abs().max().item()
    assert e_k <= 2 * e_t + ulp_floor(y_ref, dtype)
    # untouched rows: tokens without a client and tokens of the rank-0 client
    untouched = (ids == -1) | (ids == 1)
    assert torch.equal(y_k[untouched], y[untouched])

    q = torch.randn(T, fout, generator=g).to(dtype)
    for det in (False, True):
        out = tm.segment_grad(p, q, meta, segs, ranks_t, scales_t, R, cfg, deterministic=det)
        assert out.shape == (len(segs.clients), R, fout)
        for i, c in enumerate(segs.clients):
            lo, hi = meta.segment(c)
            r = ranks[c]
            ref = float(scales_t[c]) * p[lo:hi, :r].double().T @ q[meta.perm[lo:hi]].double()
            tor = (float(scales_t[c]) * (p[lo:hi, :r].to(dtype).T @ q[meta.perm[lo:hi]])).double()
            e_k, e_t = (out[i, :r].double() - ref).abs().max().item(), (tor - ref).abs().max().item()
            assert e_k <= 2 * e_t + ulp_floor(ref, dtype), (det, c, e_k, e_t)
            assert torch.all(out[i, r:] == 0)


def test_multi_client_bert_triton_matches_torch_path():
    """`to_multi_client` on a tiny BERT with the Triton backend: same logits and per-client grads as torch."""
    import torch.nn.functional as F

    from fedkernels.nn import LoRAConfig, inject_lora, to_multi_client
    from tests.nn.models import tiny_bert

    model = tiny_bert(layers=1)
    inject_lora(model, LoRAConfig(r=16, alpha=16, target_modules=["query", "value"]))
    multi = to_multi_client(model, 3)
    g = torch.Generator().manual_seed(11)
    for m in multi.modules.values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)  # B = 0 would hide dA
    multi.set_client_rank(1, None, 5)
    multi.set_client_trainable(2, None, False)
    ids = torch.randint(0, 100, (5, 7), generator=g)
    labels = torch.randint(0, 3, (5,), generator=g)
    clients = torch.tensor([0, 1, 2, 0, 1])
    results = {}
    for backend in ("torch", "triton"):
        for m in multi.modules.values():
            m.backend = backend
        multi.zero_grad()
        with multi.clients(clients):
            logits = model(input_ids=ids).logits
        sum(F.cross_entropy(logits[clients == c], labels[clients == c]) for c in range(3)).backward()
        results[backend] = (logits.detach(), {c: multi.client_grads(c) for c in range(3)})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for c in range(3):
        for name, (gA, gB) in results["triton"][1][c].items():
            rA, rB = results["torch"][1][c][name]
            torch.testing.assert_close(gA, rA, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gB, rB, rtol=1e-4, atol=1e-6)
            if c == 2:
                assert torch.all(gA == 0) and torch.all(gB == 0)
            else:
                assert gA.abs().sum() > 0
