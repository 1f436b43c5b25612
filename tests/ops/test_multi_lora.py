"""`fedkernels.ops.multi_lora_linear` (torch path) against the float64 reference."""

import pytest
import torch

from fedkernels.errors import RankError, ShapeError
from fedkernels.ops import build_meta, lora_linear, multi_lora_linear
from fedkernels.reference import multi_lora_linear_ref


def make(T, fin, fout, K, R, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, fin, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(fout, fin, dtype=dtype, generator=g) / fin**0.5
    b = torch.randn(fout, dtype=dtype, generator=g)
    A = (torch.randn(K, R, fin, dtype=dtype, generator=g) / fin**0.5).requires_grad_()
    B = torch.randn(K, fout, R, dtype=dtype, generator=g).requires_grad_()  # never zeros: hides dA bugs
    scales = torch.rand(K, dtype=torch.float64, generator=g) + 0.5
    return x, w, b, A, B, scales


def upstream(shape, dtype, seed=1):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_both(x, w, b, A, B, scales, ranks, ids, trainable=None):
    """Our op in x's dtype and the float64 reference on the same data: outputs and grads of x, A, B."""
    y = multi_lora_linear(x, w, b, A, B, scales, ranks, ids, backend="torch", trainable=trainable)
    gy = upstream(y.shape, y.dtype)
    got = torch.autograd.grad(y, (x, A, B), gy, allow_unused=True)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y_ref = multi_lora_linear_ref(x64, w.double(), b.double(), A64, B64, scales.double(), torch.as_tensor(ranks),
                                  ids)
    ref = torch.autograd.grad(y_ref, (x64, A64, B64), gy.double(), allow_unused=True)
    # the reference leaves A, B out of the graph when no token has a client: their gradient is zero
    ref = tuple(torch.zeros_like(t) if r is None else r for t, r in zip((x64, A64, B64), ref, strict=True))
    return y, got, y_ref, ref


CASES = [  # (T, in, out, K, R, ranks, ids rule)
    (37, 45, 29, 4, 16, [16, 5, 1, 9], "random"),
    (9, 7, 11, 3, 1, [1, 1, 0], "random"),
    (20, 33, 17, 5, 8, [8, 3, 8, 2, 6], "zero_client"),  # client 2 gets no token
    (13, 19, 23, 3, 4, [4, 2, 3], "all_none"),
    (1, 5, 3, 2, 2, [2, 1], "random"),
    (26, 12, 9, 3, 4, [4, 1, 3], "sorted"),  # ids already grouped: the identity-order path (no gathers)
]


def ids_for(rule, T, K, seed=2):
    g = torch.Generator().manual_seed(seed)
    if rule == "all_none":
        return torch.full((T,), -1)
    ids = torch.randint(-1, K, (T,), generator=g)
    if rule == "zero_client":
        ids[ids == 2] = 0
    if rule == "sorted":
        ids = torch.sort(ids).values
    return ids


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_reference(case, dtype, tol):
    T, fin, fout, K, R, ranks, rule = case
    x, w, b, A, B, scales = make(T, fin, fout, K, R, dtype)
    ids = ids_for(rule, T, K)
    y, got, y_ref, ref = run_both(x, w, b, A, B, scales, ranks, ids)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    for name, gg, rr in zip("xAB", got, ref, strict=True):
        torch.testing.assert_close(gg.double(), rr, rtol=tol, atol=tol, msg=f"grad {name}")
    # gradient structure: masked ranks and clients without tokens get exactly zero
    dA, dB = got[1], got[2]
    for c in range(K):
        if not (ids == c).any():
            assert torch.all(dA[c] == 0) and torch.all(dB[c] == 0)
        else:
            assert torch.all(dA[c, ranks[c]:] == 0) and torch.all(dB[c, :, ranks[c]:] == 0)
            if ranks[c]:
                assert dA[c, : ranks[c]].abs().sum() > 0
    if rule == "all_none":
        base = torch.nn.functional.linear(x, w, b)
        torch.testing.assert_close(y, base, rtol=0, atol=0)


def test_leading_dims_and_meta_reuse():
    x, w, b, A, B, scales = make(12, 10, 6, 3, 4)
    x3 = x.detach().reshape(3, 4, 10).requires_grad_()
    ids = torch.tensor([[0, 1, -1, 2], [2, 2, 0, -1], [1, 0, 0, 1]])
    meta = build_meta(ids, 3)
    y3 = multi_lora_linear(x3, w, b, A, B, scales, [4, 2, 3], meta, backend="torch")
    assert y3.shape == (3, 4, 6)
    y2 = multi_lora_linear_ref(x.detach(), w, b, A.detach(), B.detach(), scales, torch.tensor([4, 2, 3]),
                               ids.reshape(-1))
    torch.testing.assert_close(y3.reshape(12, 6), y2, rtol=1e-12, atol=1e-12)
    # the same meta serves a second layer of another width
    w2 = torch.randn(5, 10, dtype=torch.float64)
    A2, B2 = torch.randn(3, 4, 10, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    y_other = multi_lora_linear(x3, w2, None, A2, B2, scales, [1, 4, 2], meta, backend="torch")
    ref = multi_lora_linear_ref(x.detach(), w2, None, A2, B2, scales, torch.tensor([1, 4, 2]), ids.reshape(-1))
    torch.testing.assert_close(y_other.reshape(12, 5), ref, rtol=1e-12, atol=1e-12)


def test_meta_layout():
    ids = torch.tensor([3, -1, 0, 3, 0, -1, 3, 1])
    meta = build_meta(ids, 5)
    assert meta.counts.tolist() == [2, 1, 0, 3, 0]
    assert meta.host_offsets == (0, 2, 3, 3, 6, 6)
    assert meta.host_active == (0, 1, 3)
    assert meta.perm.tolist() == [2, 4, 7, 0, 3, 6]  # stable: each client's tokens in original order
    assert meta.seg_start.tolist() == [0, 2, 3] and meta.seg_len.tolist() == [2, 1, 3]
    assert meta.max_seg_len == 3 and meta.num_lora_tokens == 6
    assert meta.num_none == 2 and meta.order.tolist() == [1, 5, 2, 4, 7, 0, 3, 6] and not meta.identity_order
    assert torch.equal(meta.order[meta.inverse], torch.arange(8))
    assert build_meta(torch.tensor([-1, 0, 0, 2]), 3).identity_order
    moved = meta.to("cpu")
    assert moved.host_offsets == meta.host_offsets and torch.equal(moved.inverse, meta.inverse)


def test_frozen_clients_get_no_adapter_grad():
    T, fin, fout, K, R = 30, 21, 13, 4, 6
    x, w, b, A, B, scales = make(T, fin, fout, K, R)
    ids = ids_for("random", T, K)
    ranks = [6, 3, 5, 2]
    trainable = [True, False, True, False]
    y, got, y_ref, ref = run_both(x, w, b, A, B, scales, ranks, ids, trainable=trainable)
    torch.testing.assert_close(y, y_ref)  # frozen adapters still act in forward
    torch.testing.assert_close(got[0], ref[0])  # and dx still flows through them
    for c in range(K):
        if trainable[c]:
            torch.testing.assert_close(got[1][c], ref[1][c])
            torch.testing.assert_close(got[2][c], ref[2][c])
        else:
            assert torch.all(got[1][c] == 0) and torch.all(got[2][c] == 0)
    # every client frozen: no adapter gradient at all
    y = multi_lora_linear(x, w, b, A, B, scales, ranks, ids, backend="torch", trainable=[False] * K)
    dA, dB = torch.autograd.grad(y, (A, B), torch.randn_like(y), allow_unused=True)
    assert dA is None and dB is None


def test_each_client_equals_single_client_op():
    T, fin, fout, K, R = 40, 24, 18, 3, 8
    x, w, b, A, B, scales = make(T, fin, fout, K, R, torch.float32)
    ids = ids_for("random", T, K)
    ranks = [8, 4, 2]
    y = multi_lora_linear(x, w, b, A, B, scales, ranks, ids, backend="torch")
    gy = upstream(y.shape, y.dtype)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), gy)
    for c in range(K):
        rows = (ids == c).nonzero().squeeze(1)
        xc = x.detach()[rows].requires_grad_()
        Ac = A.detach()[c, : ranks[c]].clone().requires_grad_()
        Bc = B.detach()[c, :, : ranks[c]].clone().requires_grad_()
        yc = lora_linear(xc, w, b, Ac, Bc, float(scales[c]), backend="torch")
        torch.testing.assert_close(y[rows], yc, rtol=1e-5, atol=1e-5)
        gx, gA, gB = torch.autograd.grad(yc, (xc, Ac, Bc), gy[rows])
        torch.testing.assert_close(dx[rows], gx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dA[c, : ranks[c]], gA, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dB[c, :, : ranks[c]], gB, rtol=1e-5, atol=1e-5)


def test_x_without_grad_and_no_x_saved():
    x, w, b, A, B, scales = make(10, 8, 6, 2, 3)
    x = x.detach()
    ids = torch.tensor([0, 1, 1, 0, -1, 0, 1, 1, 0, 0])
    y = multi_lora_linear(x, w, b, A, B, scales, [3, 2], ids, backend="torch")
    dA, dB = torch.autograd.grad(y, (A, B), torch.randn_like(y))
    y_ref = multi_lora_linear_ref(x, w, b, *(t.detach().requires_grad_() for t in (A, B)), scales,
                                  torch.tensor([3, 2]), ids)
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    torch.testing.assert_close(y, y_ref)


def test_bad_inputs():
    x, w, b, A, B, scales = make(6, 8, 5, 2, 3)
    ids = torch.tensor([0, 1, 1, 0, -1, 0])
    with pytest.raises(ValueError, match="client id 2"):
        multi_lora_linear(x, w, b, A, B, scales, [3, 2], torch.tensor([0, 1, 2, 0, 0, 0]), backend="torch")
    with pytest.raises(ValueError, match="client id -2"):
        build_meta(torch.tensor([0, -2]), 2)
    with pytest.raises(RankError, match="client 1: rank 4"):
        multi_lora_linear(x, w, b, A, B, scales, [3, 4], ids, backend="torch")
    with pytest.raises(ShapeError, match="covers? 5 tokens|cover 5 tokens"):
        multi_lora_linear(x, w, b, A, B, scales, [3, 2], ids[:5], backend="torch")
    with pytest.raises(ShapeError, match="lora_B"):
        multi_lora_linear(x, w, b, A, B[:, :4], scales, [3, 2], ids, backend="torch")
    with pytest.raises(ShapeError, match="one entry per client"):
        multi_lora_linear(x, w, b, A, B, [1.0], [3, 2], ids, backend="torch")
    with pytest.raises(ShapeError, match="integer"):
        build_meta(torch.tensor([0.0, 1.0]), 2)
