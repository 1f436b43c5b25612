"""Batched linear algebra of LoRA aggregation: stacking, stacked merge, QR-of-factors SVD, FlexLoRA split.

Every op accepts an optional leading module dimension ``M`` (modules of equal shape batched into one call:
a 7B model has 32 layers x 7 modules, i.e. at most a handful of distinct shapes) and never forms a
``d_out x d_in`` product except in `merge_stacked`, whose job is to add it into the frozen weight.

Sources: FLoRA stacking (Wang et al., NeurIPS 2024, arXiv 2409.05976, `fed_utils/model_aggregation.py`);
FlexLoRA redistribution (Bai et al., NeurIPS 2024, arXiv 2402.11505, FederatedScope `FlexLoRA` branch,
`distribute_weight_fast`); the QR route is ours (shared/docs/algorithms.md sec. 3, kernels.md "torch SVD / QR":
O((d_out+d_in) S^2 + S^3) per module instead of O(d_out d_in min(d)) for a dense SVD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedkernels.errors import NonFiniteError, RankError, ShapeError
from fedkernels.ops._backend import resolve_backend

__all__ = ["stack_lora", "merge_stacked", "factor_svd", "flexlora_redistribute"]


def _weights_tensor(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape[0] != n:
        raise ShapeError(f"got {w.shape[0]} weights for {n} clients")
    return w


def stack_lora(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack client factors so that ``B_stack @ A_stack == sum_i w_i B_i A_i`` exactly.

    Args:
        As: client i's A, ``[..., r_i, in]`` (an optional leading module dim ``M`` is shared by all).
        Bs: client i's B, ``[..., out, r_i]``.
        weights: one weight per client, a float each or a tensor ``[n]`` / ``[n, M]`` (per-module weights).

    Returns:
        ``(A_stack [..., S, in], B_stack [..., out, S])`` with ``S = sum r_i``. As in FLoRA the weight goes on
        A only (B is stacked unscaled), so a zero-initialised B_i (round 0) simply contributes nothing.
    """
    if len(As) != len(Bs) or not As:
        raise ShapeError(f"stack_lora needs as many A as B factors and >= 1 client, got {len(As)} and {len(Bs)}")
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
            raise ShapeError(f"client {i}: A {tuple(A.shape)} and B {tuple(B.shape)} do not pair (rank or module dim)")
    w = _weights_tensor(weights, len(As), As[0])
    scaled = []
    for i, A in enumerate(As):
        wi = w[i]
        if wi.dim() == 1:  # per-module weights [M] broadcast over [M, r, in]
            wi = wi[:, None, None]
        scaled.append(A * wi)
    return torch.cat(scaled, dim=-2), torch.cat(list(Bs), dim=-1)


def _merge_torch(weight: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, scale: float) -> torch.Tensor:
    if weight.dtype in (torch.float16, torch.bfloat16):
        # Half-precision weights: accumulate the product in fp32 and round once (CPU bf16 GEMMs are both slow,
        # 1.3 GFLOP/s measured, and would round every partial sum).
        tmp = weight.float().baddbmm_(B_stack.float(), A_stack.float(), alpha=scale)
        weight.copy_(tmp)
    else:
        weight.baddbmm_(B_stack.to(weight.dtype), A_stack.to(weight.dtype), alpha=scale)
    return weight


def merge_stacked(
    weight: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, scale: float, *, backend: str = "auto"
) -> torch.Tensor:
    """``weight += scale * B_stack @ A_stack`` in place, for ``M`` modules of equal shape in one launch.

    Args:
        weight: frozen base weights ``[M, out, in]`` (modified in place and returned).
        A_stack: ``[M, S, in]``; B_stack: ``[M, out, S]`` (from `stack_lora`).
        scale: LoRA scale of the stacked adapter (1.0 when the client scales are folded into A_stack).
        backend: "torch" (baddbmm), "triton" (`fedkernels.ops.triton_merge`, CUDA or TRITON_INTERPRET=1), "auto".
    """
    if weight.dim() != 3 or A_stack.dim() != 3 or B_stack.dim() != 3:
        raise ShapeError(
            f"merge_stacked wants weight [M,out,in], A_stack [M,S,in], B_stack [M,out,S]; got "
            f"{tuple(weight.shape)}, {tuple(A_stack.shape)}, {tuple(B_stack.shape)}"
        )
    M, out_f, in_f = weight.shape
    S = A_stack.shape[1]
    if A_stack.shape != (M, S, in_f) or B_stack.shape != (M, out_f, S):
        raise ShapeError(
            f"merge_stacked: weight {tuple(weight.shape)} needs A_stack [{M},S,{in_f}] and B_stack [{M},{out_f},S]; "
            f"got {tuple(A_stack.shape)} and {tuple(B_stack.shape)}"
        )
    if not (isinstance(scale, int | float) and torch.isfinite(torch.tensor(float(scale)))):
        raise NonFiniteError(f"merge_stacked: scale must be a finite number, got {scale!r}")
    if S == 0:
        return weight
    if resolve_backend(backend, weight) == "triton":
        from fedkernels.ops import triton_merge  # lazy: triton is heavy and only used on CUDA / interpreter

        return triton_merge.merge_stacked_triton(weight, A_stack, B_stack, float(scale))
    return _merge_torch(weight, A_stack, B_stack, float(scale))


def _qr_r(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR without forming Q: (reflectors, tau, R [.., min(m,n), n]); Q is applied later with ormqr
    only to the columns that are needed (forming Q costs as much as the factorisation itself)."""
    a, tau = torch.geqrf(X)
    k = min(X.shape[-2], X.shape[-1])
    return a, tau, torch.triu(a[..., :k, :])


def _apply_q(a: torch.Tensor, tau: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``Q[:, :k] @ X`` for ``X [.., k, c]`` (k = min(m, n) of the factorised matrix), via LAPACK ormqr."""
    m, k = a.shape[-2], X.shape[-2]
    if m > k:
        X = torch.cat([X, X.new_zeros(*X.shape[:-2], m - k, X.shape[-1])], dim=-2)
    return torch.ormqr(a, tau, X.contiguous())


def factor_svd(
    B_stack: torch.Tensor, A_stack: torch.Tensor, *, k: int | None = None, compute_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B_stack @ A_stack`` from the factors, never forming the ``out x in`` product.

    ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR), core ``C = R_b R_a^T`` (``S x S``), ``C = U_c diag(s) V_c^T``;
    then ``B A = (Q_b U_c) diag(s) (Q_a V_c)^T``. Cost ``~ 4 (out+in) S^2 + O(S^3)`` FLOPs per module. Q is never
    formed: the Householder reflectors are applied (ormqr) to the ``k`` wanted singular vectors only.

    Args:
        B_stack: ``[..., out, S]``; A_stack: ``[..., S, in]`` (leading dims are batched).
        k: number of leading singular triplets to return (default all ``K = min(S, out, in)``; values are exact
            either way, ``k`` only saves the vector work).
        compute_dtype: dtype of the QR/SVD; default: the inputs' dtype, at least float32.

    Returns:
        ``U [..., out, k]``, ``S [..., k]`` (descending), ``Vh [..., k, in]`` with ``U @ diag(S) @ Vh ==
        B_stack @ A_stack`` up to rounding when ``k = K``. Works for zero factors (round 0: S = 0).
    """
    if B_stack.shape[-1] != A_stack.shape[-2] or B_stack.shape[:-2] != A_stack.shape[:-2]:
        raise ShapeError(f"factor_svd: B {tuple(B_stack.shape)} and A {tuple(A_stack.shape)} do not pair")
    dtype = compute_dtype or torch.promote_types(torch.promote_types(B_stack.dtype, A_stack.dtype), torch.float32)
    ab, tb, Rb = _qr_r(B_stack.to(dtype))  # R_b [.., k1, S]
    # A^T of a row-major A is already column-major, the layout LAPACK factorises: no transposing copy
    aa, ta, Ra = _qr_r(A_stack.to(dtype).transpose(-1, -2))  # R_a [.., k2, S]
    core = Rb @ Ra.transpose(-1, -2)  # [.., k1, k2]
    Uc, s, Vch = torch.linalg.svd(core, full_matrices=False)
    K = s.shape[-1]
    k = K if k is None else max(0, min(int(k), K))
    U = _apply_q(ab, tb, Uc[..., :, :k])
    Vh = _apply_q(aa, ta, Vch[..., :k, :].transpose(-1, -2)).transpose(-1, -2)
    return U, s[..., :k], Vh


def flexlora_redistribute(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    ranks: Sequence[int],
    *,
    scales: Sequence[float] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FlexLoRA server step: each target gets the best rank-r_i approximation of ``W = sum_k w_k B_k A_k``.

    The FlexLoRA code (`distribute_weight_fast`) puts all singular values on B; we split ``sqrt(sigma)`` between
    the factors (balanced factors keep the local optimiser's two factors on the same scale; the product, which
    is all Eckart-Young speaks about, is the same).

    Args:
        As, Bs, weights: as in `stack_lora` (fold each client's LoRA scale s_k into its weight).
        ranks: one target rank per output (usually one per client).
        scales: LoRA scale of each output; ``scales[i] * B_i @ A_i`` is the approximation (default 1.0).

    Returns:
        ``[(A_i [..., r_i, in], B_i [..., out, r_i]), ...]`` in the factors' dtype. Ranks above ``rank(W)``'s bound
        ``min(S, out, in)`` are zero-padded (the extra directions carry a zero singular value).
    """
    if scales is not None and len(scales) != len(ranks):
        raise ShapeError(f"flexlora_redistribute: {len(scales)} scales for {len(ranks)} ranks")
    for i, r in enumerate(ranks):
        if int(r) != r or r < 0:
            raise RankError(f"flexlora_redistribute: target {i} has rank {r!r}; ranks must be non-negative integers")
    A_stack, B_stack = stack_lora(As, Bs, weights)
    U, s, Vh = factor_svd(B_stack, A_stack, k=max(ranks, default=0), compute_dtype=compute_dtype)
    K = s.shape[-1]
    out_dtype = As[0].dtype
    res = []
    for i, r in enumerate(ranks):
        r = int(r)
        sc = 1.0 if scales is None else float(scales[i])
        if not sc > 0:
            raise ValueError(f"flexlora_redistribute: scale of target {i} must be positive, got {sc!r}")
        k = min(r, K)
        root = torch.sqrt(s[..., :k] / sc)
        A_i = root[..., :, None] * Vh[..., :k, :]
        B_i = U[..., :, :k] * root[..., None, :]
        if k < r:  # pad: rank(W) <= S < r
            A_i = torch.cat([A_i, A_i.new_zeros(*A_i.shape[:-2], r - k, A_i.shape[-1])], dim=-2)
            B_i = torch.cat([B_i, B_i.new_zeros(*B_i.shape[:-1], r - k)], dim=-1)
        res.append((A_i.to(out_dtype).contiguous(), B_i.to(out_dtype).contiguous()))
    return res
