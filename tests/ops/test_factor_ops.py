"""Identities of the batched aggregation ops in float64 on random factors."""

from __future__ import annotations

import math

import pytest
import torch

from fedkernels.errors import NonFiniteError, ShapeError
from fedkernels.ops import factor_svd, flexlora_redistribute, merge_stacked, stack_lora

D = torch.float64


def _clients(ranks, d_out=23, d_in=31, lead=(), dtype=D):
    As = [torch.randn(*lead, r, d_in, dtype=dtype) for r in ranks]
    Bs = [torch.randn(*lead, d_out, r, dtype=dtype) for r in ranks]
    return As, Bs


@pytest.mark.parametrize("lead", [(), (3,)])
def test_stack_equals_weighted_sum_of_products(lead):
    As, Bs = _clients([2, 5, 3], lead=lead)
    w = torch.rand(3, dtype=D) + 0.1
    A_s, B_s = stack_lora(As, Bs, w)
    ref = sum(w[i] * Bs[i] @ As[i] for i in range(3))
    assert A_s.shape[-2] == 10 and B_s.shape[-1] == 10
    torch.testing.assert_close(B_s @ A_s, ref, rtol=1e-12, atol=1e-12)


def test_stack_per_module_weights():
    As, Bs = _clients([2, 4], lead=(3,))
    w = torch.rand(2, 3, dtype=D) + 0.1
    A_s, B_s = stack_lora(As, Bs, w)
    ref = sum(w[i][:, None, None] * Bs[i] @ As[i] for i in range(2))
    torch.testing.assert_close(B_s @ A_s, ref, rtol=1e-12, atol=1e-12)


def test_stack_rejects_mismatched_pairs():
    As, Bs = _clients([2, 3])
    with pytest.raises(ShapeError, match="client 1"):
        stack_lora(As, [Bs[0], Bs[0]], [0.5, 0.5])


@pytest.mark.parametrize("lead", [(), (4,)])
def test_factor_svd_matches_dense_svd(lead):
    As, Bs = _clients([3, 6, 4], d_out=40, d_in=29, lead=lead)
    A_s, B_s = stack_lora(As, Bs, [0.2, 0.5, 0.3])
    U, S, Vh = factor_svd(B_s, A_s)
    dense = B_s @ A_s
    S_ref = torch.linalg.svdvals(dense)
    K = S.shape[-1]
    assert K == 13
    torch.testing.assert_close(S, S_ref[..., :K], rtol=1e-10, atol=1e-10)
    # rank(BA) <= 13: the dense tail is rounding noise
    assert float(S_ref[..., K:].abs().max()) < 1e-10 * float(S_ref.max())
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, dense, rtol=1e-10, atol=1e-10)
    eye = torch.eye(K, dtype=D).expand(*lead, K, K)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.transpose(-1, -2), eye, atol=1e-10, rtol=0)


def test_factor_svd_zero_B_round0():
    As, _ = _clients([3, 4])
    Bs = [torch.zeros(23, 3, dtype=D), torch.zeros(23, 4, dtype=D)]
    A_s, B_s = stack_lora(As, Bs, [0.5, 0.5])
    U, S, Vh = factor_svd(B_s, A_s)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert float(S.abs().max()) == 0.0
    outs = flexlora_redistribute(As, Bs, [0.5, 0.5], [2, 5])
    for A, B in outs:
        assert torch.isfinite(A).all() and float((B @ A).abs().max()) == 0.0


def test_flexlora_is_best_rank_r_eckart_young():
    As, Bs = _clients([4, 8, 2], d_out=30, d_in=26)
    w = [0.3, 0.5, 0.2]
    ranks = [2, 5, 14, 20]  # 20 > S = 14: padded with zero directions
    scales = [0.5, 2.0, 1.0, 4.0]
    dense = sum(wi * B @ A for wi, A, B in zip(w, As, Bs, strict=True))
    S_ref = torch.linalg.svdvals(dense)
    outs = flexlora_redistribute(As, Bs, w, ranks, scales=scales)
    for (A, B), r, s in zip(outs, ranks, scales, strict=True):
        assert A.shape == (r, 26) and B.shape == (30, r)
        err = torch.linalg.matrix_norm(dense - s * B @ A)
        tail = torch.sqrt((S_ref[r:] ** 2).sum())
        torch.testing.assert_close(err, tail, rtol=1e-8, atol=1e-10)
        # sqrt(S) split: both factors carry the same singular values
        torch.testing.assert_close(torch.linalg.svdvals(B), torch.linalg.svdvals(A), rtol=1e-8, atol=1e-10)


def test_flexlora_orthonormal_a_split_is_the_same_best_product_with_unit_a():
    As, Bs = _clients([4, 8, 2], d_out=30, d_in=26)
    w = [0.3, 0.5, 0.2]
    ranks, scales = [3, 9], [0.5, 2.0]
    dense = sum(wi * B @ A for wi, A, B in zip(w, As, Bs, strict=True))
    balanced = flexlora_redistribute(As, Bs, w, ranks, scales=scales)
    unit = flexlora_redistribute(As, Bs, w, ranks, scales=scales, split="orthonormal-a")
    for (A, B), (A1, B1), r, s in zip(balanced, unit, ranks, scales, strict=True):
        torch.testing.assert_close(s * B1 @ A1, s * B @ A, rtol=1e-8, atol=1e-10)  # the same product
        torch.testing.assert_close(A1 @ A1.T, torch.eye(r, dtype=D), rtol=0, atol=1e-10)  # A: orthonormal rows
        # B carries all of sigma: its singular values are those of the product / s
        torch.testing.assert_close(torch.linalg.svdvals(B1), torch.linalg.svdvals(dense)[:r] / s, rtol=1e-8,
                                   atol=1e-10)
    with pytest.raises(ValueError, match="split must be one of .*'sqrt'"):
        flexlora_redistribute(As, Bs, w, ranks, split="sqrt")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_merge_stacked_torch_in_place(dtype):
    M, out_f, in_f, S = 3, 17, 21, 9
    W = torch.randn(M, out_f, in_f, dtype=D)
    A = torch.randn(M, S, in_f, dtype=D)
    B = torch.randn(M, out_f, S, dtype=D)
    ref = W + 0.37 * B @ A
    w = W.to(dtype)
    ptr = w.data_ptr()
    out = merge_stacked(w, A.to(dtype), B.to(dtype), 0.37, backend="torch")
    assert out.data_ptr() == ptr == w.data_ptr()
    # tolerance: a few ulps of the result's magnitude (|ref| <~ 15) in the weight's dtype
    tol = 8 * torch.finfo(dtype).eps * float(ref.abs().max())
    assert float((w.double() - ref).abs().max()) <= tol


def test_merge_stacked_equals_client_loop():
    As, Bs = _clients([2, 5, 3], lead=(2,))
    w = [0.2, 0.5, 0.3]
    W = torch.randn(2, 23, 31, dtype=D)
    loop = W.clone()
    for wi, A, B in zip(w, As, Bs, strict=True):
        loop += 1.5 * wi * B @ A
    A_s, B_s = stack_lora(As, Bs, w)
    merge_stacked(W, A_s, B_s, 1.5, backend="torch")
    torch.testing.assert_close(W, loop, rtol=1e-12, atol=1e-12)


def test_merge_stacked_errors():
    W = torch.randn(2, 5, 6)
    with pytest.raises(ShapeError, match=r"\[2,5,S\]"):
        merge_stacked(W, torch.randn(2, 3, 6), torch.randn(2, 4, 3), 1.0)
    with pytest.raises(NonFiniteError, match="nan"):
        merge_stacked(W, torch.randn(2, 3, 6), torch.randn(2, 5, 3), float("nan"))


def test_factor_svd_top_k_matches_full():
    As, Bs = _clients([3, 6, 4], d_out=40, d_in=29, lead=(2,))
    A_s, B_s = stack_lora(As, Bs, [0.2, 0.5, 0.3])
    U, S, Vh = factor_svd(B_s, A_s)
    Uk, Sk, Vhk = factor_svd(B_s, A_s, k=5)
    assert Uk.shape == (2, 40, 5) and Sk.shape == (2, 5) and Vhk.shape == (2, 5, 29)
    torch.testing.assert_close(Sk, S[..., :5], rtol=1e-12, atol=1e-12)
    # singular vectors agree up to sign: compare the rank-5 projections
    top5 = U[..., :5] @ torch.diag_embed(S[..., :5]) @ Vh[..., :5, :]
    torch.testing.assert_close(Uk @ torch.diag_embed(Sk) @ Vhk, top5, rtol=1e-10, atol=1e-10)


def test_factor_svd_float32_close_to_float64():
    As, Bs = _clients([4, 8, 16], d_out=96, d_in=80)
    A_s, B_s = stack_lora(As, Bs, [0.3, 0.3, 0.4])
    _, S32, _ = factor_svd(B_s.float(), A_s.float())
    S64 = torch.linalg.svdvals(B_s @ A_s)[:28]
    assert S32.dtype == torch.float32
    assert float(((S32.double() - S64).abs() / S64).max()) < 1e-5


# --- factor_svd: GEMM route for the vectors, reflector (ormqr) fallback ---------------------------------------


def _orth_err(U: torch.Tensor, Vh: torch.Tensor) -> float:
    k = U.shape[-1]
    eye = torch.eye(k, dtype=torch.float64)
    return max(float((U.double().transpose(-1, -2) @ U.double() - eye).abs().max()),
               float((Vh.double() @ Vh.double().transpose(-1, -2) - eye).abs().max()))


def _count_reflector_calls(monkeypatch) -> list[int]:
    from fedkernels.ops import factor_ops as agg

    calls: list[int] = []
    real = agg._apply_q

    def spy(a, tau, X):
        calls.append(a.shape[0])
        return real(a, tau, X)

    monkeypatch.setattr(agg, "_apply_q", spy)
    return calls


@pytest.mark.parametrize("k", [None, 4])
def test_factor_svd_gemm_route_equals_reflector_route(k, monkeypatch):
    As, Bs = _clients([3, 6, 4], d_out=40, d_in=29, lead=(3,))
    A_s, B_s = stack_lora(As, Bs, [0.2, 0.5, 0.3])
    calls = _count_reflector_calls(monkeypatch)
    U, S, Vh = factor_svd(B_s, A_s, k=k)
    assert calls == []  # well-conditioned random factors: the vectors come from the two GEMMs
    Ur, Sr, Vhr = factor_svd(B_s, A_s, k=k, orth_tol=0.0)  # forced reflector route
    assert calls == [3, 3]
    torch.testing.assert_close(S, Sr, rtol=1e-12, atol=1e-12)
    # same singular subspaces: the rank-k reconstructions agree, and both are orthonormal
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, Ur @ torch.diag_embed(Sr) @ Vhr, rtol=1e-10, atol=1e-10)
    assert _orth_err(U, Vh) < 1e-12 and _orth_err(Ur, Vhr) < 1e-12


def test_factor_svd_cancelling_clients_fall_back_to_reflectors(monkeypatch):
    """Client 2 nearly undoes client 1 (fp32): dividing the GEMMs by the tiny s_j would cost orthogonality
    (measured 1e-3 without the check); the module takes the reflector route and stays orthonormal."""
    g = torch.Generator().manual_seed(3)
    d, r = 256, 16
    A1 = torch.randn(r, d, generator=g) / d**0.5
    B1 = torch.randn(d, r, generator=g) * 0.02
    A2 = A1 + 1e-4 * torch.randn(r, d, generator=g) / d**0.5
    B2 = -B1 + 1e-4 * torch.randn(d, r, generator=g) * 0.02
    good_As, good_Bs = [torch.randn(r, d, generator=g) / d**0.5, A1], [torch.randn(d, r, generator=g) * 0.02, B1]
    # module 0: well-conditioned pair; module 1: the cancelling pair
    As = [torch.stack([good_As[0], A1]), torch.stack([good_As[1], A2])]
    Bs = [torch.stack([good_Bs[0], B1]), torch.stack([good_Bs[1], B2])]
    A_s, B_s = stack_lora(As, Bs, [1.0, 1.0])
    calls = _count_reflector_calls(monkeypatch)
    U, S, Vh = factor_svd(B_s, A_s, k=8)
    assert calls == [1, 1]  # only the cancelling module was redone
    assert _orth_err(U[1], Vh[1]) < 1e-5 and _orth_err(U[0], Vh[0]) < 1e-5
    S64 = torch.linalg.svdvals(B_s.double() @ A_s.double())[..., :8]
    # singular values are exact either way (they come from the core SVD)
    assert float(((S.double() - S64).abs() / S64).max()) < 1e-2  # module 1 is ill-conditioned in fp32
    assert float(((S[0].double() - S64[0]).abs() / S64[0]).max()) < 1e-5


def test_factor_svd_rejects_negative_orth_tol():
    As, Bs = _clients([2, 3])
    A_s, B_s = stack_lora(As, Bs, [0.5, 0.5])
    with pytest.raises(ValueError, match="orth_tol"):
        factor_svd(B_s, A_s, orth_tol=-1.0)


# --- scratch buffers: reused, never visible in the results ----------------------------------------------------


def test_flexlora_results_do_not_alias_scratch():
    from fedkernels.ops import _scratch

    As, Bs = _clients([3, 5], d_out=33, d_in=27, lead=(2,), dtype=torch.float32)
    first = flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])
    kept = [(A.clone(), B.clone()) for A, B in first]
    held = {k: v.data_ptr() for k, v in _scratch._HELD.buffers.items()}
    assert {"flexlora.A", "flexlora.B", "factor_svd.A", "factor_svd.B"} <= set(held)
    As2, Bs2 = _clients([3, 5], d_out=33, d_in=27, lead=(2,), dtype=torch.float32)
    flexlora_redistribute(As2, Bs2, [0.5, 0.5], [2, 4])
    assert {k: v.data_ptr() for k, v in _scratch._HELD.buffers.items()} == held  # reused, not reallocated
    for (A, B), (A0, B0) in zip(first, kept, strict=True):  # a later call did not overwrite earlier results
        assert torch.equal(A, A0) and torch.equal(B, B0)
    scratch_ptrs = set(held.values())
    assert not any(t.untyped_storage().data_ptr() in scratch_ptrs for pair in first for t in pair)


def test_scratch_cap_and_release_keep_results(monkeypatch):
    from fedkernels.ops import _scratch

    As, Bs = _clients([3, 5], d_out=33, d_in=27, dtype=torch.float32)
    ref = flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])
    _scratch.release_scratch()
    assert _scratch.scratch_bytes() == 0
    monkeypatch.setenv("FEDKERNELS_SCRATCH_MB", "0")  # nothing may be kept: fresh tensors, same numbers
    out = flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])
    assert _scratch.scratch_bytes() == 0
    for (A, B), (A0, B0) in zip(out, ref, strict=True):
        assert torch.equal(A, A0) and torch.equal(B, B0)
    monkeypatch.setenv("FEDKERNELS_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="FEDKERNELS_SCRATCH_MB"):
        flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])


def test_scratch_is_per_thread():
    import threading

    from fedkernels.ops import _scratch

    As, Bs = _clients([3, 5], d_out=33, d_in=27, dtype=torch.float32)
    flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])
    mine = _scratch._HELD.buffers["flexlora.A"].data_ptr()
    seen = {}

    def work():
        flexlora_redistribute(As, Bs, [0.4, 0.6], [2, 4])
        seen["ptr"] = _scratch._HELD.buffers["flexlora.A"].data_ptr()
        _scratch.release_scratch()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["ptr"] != mine and _scratch._HELD.buffers["flexlora.A"].data_ptr() == mine


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_flexlora_chunks_agree_with_one_batch(lead):
    As, Bs = _clients([3, 6, 4], d_out=30, d_in=26, lead=lead)
    n_mod = math.prod(lead)
    w = torch.rand(3, n_mod, dtype=D) + 0.1 if len(lead) == 1 else [0.2, 0.5, 0.3]
    ranks, scales = [2, 5, 14, 20], [0.5, 2.0, 1.0, 4.0]
    whole = flexlora_redistribute(As, Bs, w, ranks, scales=scales, modules_per_chunk=n_mod)
    for step in (1, 2):
        parts = flexlora_redistribute(As, Bs, w, ranks, scales=scales, modules_per_chunk=step)
        for (A, B), (A0, B0), r in zip(parts, whole, ranks, strict=True):
            assert A.shape == (*lead, r, 26) and B.shape == (*lead, 30, r)
            torch.testing.assert_close(A, A0, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(B, B0, rtol=1e-12, atol=1e-12)
    # and each module's result is its own best approximation (module (0[, 0]) checked against a dense SVD)
    first = (0,) * len(lead)
    dense = sum((w[i][0] if len(lead) == 1 else w[i]) * Bs[i][first] @ As[i][first] for i in range(3))
    U, S, Vh = torch.linalg.svd(dense)
    A, B = whole[1]
    torch.testing.assert_close(2.0 * B[first] @ A[first], (U[:, :5] * S[:5]) @ Vh[:5], rtol=1e-9, atol=1e-9)


def test_flexlora_rejects_bad_chunks_and_weights():
    As, Bs = _clients([3, 4], lead=(4,))
    with pytest.raises(ValueError, match="modules_per_chunk"):
        flexlora_redistribute(As, Bs, [0.5, 0.5], [2], modules_per_chunk=0)
    with pytest.raises(ShapeError, match="per-module weights"):
        flexlora_redistribute(As, Bs, torch.rand(2, 3, dtype=D), [2])
    with pytest.raises(ShapeError, match="differ from client 0"):
        flexlora_redistribute([As[0], As[1][..., :30]], [Bs[0], Bs[1]], [0.5, 0.5], [2])


@pytest.mark.parametrize("d_out,d_in", [(5, 30), (30, 6), (4, 4)])
def test_factor_svd_more_stacked_ranks_than_rows_or_columns(d_out, d_in):
    """S = 13 > min(out, in): R_b or R_a is trapezoidal and the core is rectangular."""
    As, Bs = _clients([3, 6, 4], d_out=d_out, d_in=d_in, lead=(2,))
    A_s, B_s = stack_lora(As, Bs, [0.2, 0.5, 0.3])
    U, S, Vh = factor_svd(B_s, A_s)
    K = min(13, d_out, d_in)
    assert U.shape == (2, d_out, K) and S.shape == (2, K) and Vh.shape == (2, K, d_in)
    dense = B_s @ A_s
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[..., :K], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, dense, rtol=1e-10, atol=1e-10)
    assert _orth_err(U[0], Vh[0]) < 1e-10 and _orth_err(U[1], Vh[1]) < 1e-10
