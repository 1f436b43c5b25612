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

import math
from collections.abc import Sequence

import torch

from fedkernels.errors import ConfigError, NonFiniteError, RankError, ShapeError
from fedkernels.ops._backend import resolve_backend
from fedkernels.ops._scratch import scratch

__all__ = ["SPLITS", "stack_lora", "merge_stacked", "factor_svd", "flexlora_redistribute"]


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
    return _stack_into(As, Bs, weights)


def _check_pairs(As, Bs) -> None:
    if len(As) != len(Bs) or not As:
        raise ShapeError(f"stacking needs as many A as B factors and >= 1 client, got {len(As)} and {len(Bs)}")
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
            raise ShapeError(f"client {i}: A {tuple(A.shape)} and B {tuple(B.shape)} do not pair (rank or module dim)")
        if A.shape[-1] != As[0].shape[-1] or B.shape[-2] != Bs[0].shape[-2] or A.shape[:-2] != As[0].shape[:-2]:
            raise ShapeError(f"client {i}: A {tuple(A.shape)} / B {tuple(B.shape)} differ from client 0's "
                             f"{tuple(As[0].shape)} / {tuple(Bs[0].shape)} beyond the rank")


def _stack_into(As, Bs, weights, scratch_roles: tuple[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`stack_lora` into fresh tensors, or into the reused scratch buffers ``scratch_roles`` (for callers whose
    stacks never leave them). The weight is applied while stacking: one pass over A and one over B."""
    _check_pairs(As, Bs)
    roles = scratch_roles or (None, None)

    def alloc(role, shape, dtype, device, column_major=False):
        if role is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return scratch(role, shape, dtype, device, column_major=column_major)

    w = _weights_tensor(weights, len(As), As[0])
    S = sum(A.shape[-2] for A in As)
    A0, B0 = As[0], Bs[0]
    A_stack = alloc(roles[0], (*A0.shape[:-2], S, A0.shape[-1]), torch.promote_types(A0.dtype, w.dtype), A0.device)
    # scratch B is column-major, the layout geqrf factorises: its copy in `factor_svd` is then a plain memcpy
    # instead of a transposing one (0.3 ms spent here saves ~1 ms there per 2048 x 248 fp32 module)
    B_stack = alloc(roles[1], (*B0.shape[:-2], B0.shape[-2], S), B0.dtype, B0.device, column_major=True)
    off = 0
    for i, A in enumerate(As):
        wi = w[i]
        if wi.dim() == 1:  # per-module weights [M] broadcast over [M, r, in]
            wi = wi[:, None, None]
        torch.mul(A, wi, out=A_stack[..., off:off + A.shape[-2], :])
        off += A.shape[-2]
    if B_stack.is_contiguous():  # cat: 2x faster than the column-slice copies (0.23 vs 0.47 ms, 4 x 2048 x 248)
        torch.cat(list(Bs), dim=-1, out=B_stack)
    else:
        off = 0
        for B in Bs:
            B_stack[..., off:off + B.shape[-1]].copy_(B)
            off += B.shape[-1]
    return A_stack, B_stack


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


def _qr_r(X: torch.Tensor, role: str = "qr") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR without forming Q: (reflectors, tau, R [.., min(m,n), n]); Q is applied later with ormqr
    only to the columns that are needed (forming Q costs as much as the factorisation itself). The reflectors
    go to a reused scratch buffer (``role``): they never leave `factor_svd`."""
    m, n = X.shape[-2], X.shape[-1]
    k = min(m, n)
    a = scratch(role, X.shape, X.dtype, X.device, column_major=True)
    tau = scratch(role + ".tau", (*X.shape[:-2], k), X.dtype, X.device)
    torch.geqrf(X, out=(a, tau))
    # R = triu of the top k x n block; tril of its transpose walks the column-major storage in order (6x faster)
    return a, tau, a[..., :k, :].transpose(-1, -2).tril().transpose(-1, -2)


def _apply_q(a: torch.Tensor, tau: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``Q[:, :k] @ X`` for ``X [.., k, c]`` (k = min(m, n) of the factorised matrix), via LAPACK ormqr."""
    m, k = a.shape[-2], X.shape[-2]
    if m > k:
        X = torch.cat([X, X.new_zeros(*X.shape[:-2], m - k, X.shape[-1])], dim=-2)
    return torch.ormqr(a, tau, X.contiguous())


def factor_svd(
    B_stack: torch.Tensor,
    A_stack: torch.Tensor,
    *,
    k: int | None = None,
    compute_dtype: torch.dtype | None = None,
    orth_tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B_stack @ A_stack`` from the factors, never forming the ``out x in`` product.

    ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced Householder QR, Q kept as reflectors), core ``C = R_b R_a^T``
    (``S x S``), ``C = U_c diag(s) V_c^T``; then ``B A = (Q_b U_c) diag(s) (Q_a V_c)^T``.

    The ``k`` wanted singular vectors are taken without applying Q: since ``C V_c = U_c diag(s)``,
    ``Q_b U_c[:, j] = B (R_a^T V_c[:, j]) / s_j`` and ``Q_a V_c[:, j] = A^T (R_b^T U_c[:, j]) / s_j``, two skinny
    GEMMs (``2 (out+in) S k`` FLOPs) instead of applying ``S`` reflectors with LAPACK ormqr (``~4 (out+in) S k``
    and BLAS-2 bound): measured 0.9 ms vs 4.2 ms per side at out=in=2048, S=248, k=64, fp32, one core.
    Dividing by ``s_j`` amplifies the GEMMs' rounding by ``~||B||_2 ||A||_2 / s_j``, which shows up as lost
    orthogonality of the vectors (the product ``U diag(s) Vh`` is as accurate as the reflector route's: the QR
    itself already carries that amplification). So the result is checked: a module whose ``U`` or ``Vh`` is
    off orthonormal by more than ``orth_tol`` (cancelling clients; zero factors in round 0, ``s_j = 0``) is
    recomputed from the reflectors (ormqr), whose vectors are orthonormal to a few ulps.

    Cost ``~ 4 (out+in) S^2 + 2 (out+in) S k + 4 (out+in) k^2 + O(S^3)`` FLOPs per module.

    Args:
        B_stack: ``[..., out, S]``; A_stack: ``[..., S, in]`` (leading dims are batched).
        k: number of leading singular triplets to return (default all ``K = min(S, out, in)``; values are exact
            either way, ``k`` only saves the vector work).
        compute_dtype: dtype of the QR/SVD; default: the inputs' dtype, at least float32.
        orth_tol: largest accepted ``max |U^T U - I|`` (and the same for ``Vh``) of the GEMM route; default
            ``128 eps`` of the compute dtype (1.5e-5 in fp32; the reflector route reaches ~10-30 eps). ``0``
            forces the reflector route everywhere.

    Returns:
        ``U [..., out, k]``, ``S [..., k]`` (descending), ``Vh [..., k, in]`` (both row-major) with
        ``U @ diag(S) @ Vh == B_stack @ A_stack`` up to rounding when ``k = K``. Works for zero factors (round 0:
        S = 0).
    """
    return _factor_svd(B_stack, A_stack, k, compute_dtype, orth_tol, vector_roles=None)


def _factor_svd(B_stack, A_stack, k, compute_dtype, orth_tol, vector_roles: tuple[str, str] | None):
    """`factor_svd`; ``vector_roles`` puts U and Vh in reused scratch (for callers that only read them)."""
    if B_stack.shape[-1] != A_stack.shape[-2] or B_stack.shape[:-2] != A_stack.shape[:-2]:
        raise ShapeError(f"factor_svd: B {tuple(B_stack.shape)} and A {tuple(A_stack.shape)} do not pair")
    dtype = compute_dtype or torch.promote_types(torch.promote_types(B_stack.dtype, A_stack.dtype), torch.float32)
    tol = 128 * torch.finfo(dtype).eps if orth_tol is None else float(orth_tol)
    if not tol >= 0:
        raise ConfigError(f"factor_svd: orth_tol must be >= 0, got {orth_tol!r}")
    B, A = B_stack.to(dtype), A_stack.to(dtype)
    ab, tb, Rb = _qr_r(B, "factor_svd.B")  # R_b [.., k1, S]
    aa, ta, Ra = _qr_r(A.transpose(-1, -2), "factor_svd.A")  # R_a [.., k2, S]
    core = Rb @ Ra.transpose(-1, -2)  # [.., k1, k2]
    Uc, s, Vch = torch.linalg.svd(core, full_matrices=False)
    K = s.shape[-1]
    k = K if k is None else max(0, min(int(k), K))
    Uck, Vck, sk = Uc[..., :, :k], Vch[..., :k, :].transpose(-1, -2), s[..., :k]
    lead = s.shape[:-1]
    u_shape, vh_shape = (*lead, B.shape[-2], k), (*lead, k, A.shape[-1])
    if vector_roles is None:
        U, Vh = B.new_empty(u_shape), B.new_empty(vh_shape)
    else:
        U, Vh = (scratch(r, sh, dtype, B.device) for r, sh in zip(vector_roles, (u_shape, vh_shape), strict=True))
    if tol > 0 and k > 0:
        # 1/s_j folded into the small S x k factors: no extra pass over the out x k / k x in results
        torch.matmul(B, (Ra.transpose(-1, -2) @ Vck) / sk[..., None, :], out=U)
        torch.matmul((Uck.transpose(-1, -2) @ Rb) / sk[..., :, None], A, out=Vh)
        eye = torch.eye(k, dtype=dtype, device=s.device)
        dev = torch.maximum(
            (U.transpose(-1, -2) @ U - eye).abs().amax(dim=(-2, -1)),
            (Vh @ Vh.transpose(-1, -2) - eye).abs().amax(dim=(-2, -1)),
        )
        redo = ~(dev <= tol)  # NaN (0/0 in round 0) counts as failed
    else:
        redo = torch.ones(lead, dtype=torch.bool, device=s.device)
    if k > 0 and bool(redo.any()):
        flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
        i = redo.reshape(-1).nonzero().squeeze(-1)
        Uf, Vhf = flat(U), flat(Vh)  # views: U and Vh are contiguous
        Uf[i] = _apply_q(flat(ab)[i], tb.reshape(-1, tb.shape[-1])[i], flat(Uck)[i])
        Vhf[i] = _apply_q(flat(aa)[i], ta.reshape(-1, ta.shape[-1])[i], flat(Vck)[i]).transpose(-1, -2)
    return U, sk, Vh


# Modules per chunk on the CPU: the stacks of one chunk (S x (in + out) floats per module) stay near this many
# bytes. Measured at out=in=2048, S=248, fp32, one core (2 x 4 MiB stacks per module): 19.7 / 19.4 / 19.1 /
# 20.9 ms per module with 1 / 2 / 4 / 8 modules per call, and 57 ms with all 224 of a round in one call.
CPU_CHUNK_BYTES = 16 << 20


def _modules_per_chunk(n_mod: int, S: int, n_in: int, n_out: int, itemsize: int, device: torch.device) -> int:
    if device.type != "cpu":  # a GPU wants the whole batch at once; its caching allocator reuses the memory
        return max(1, n_mod)
    return max(1, min(n_mod, CPU_CHUNK_BYTES // max(1, S * (n_in + n_out) * itemsize)))


# How `flexlora_redistribute` puts the singular values on the factors (its docstring).
SPLITS = ("balanced", "orthonormal-a")


def flexlora_redistribute(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    ranks: Sequence[int],
    *,
    scales: Sequence[float] | None = None,
    compute_dtype: torch.dtype | None = None,
    modules_per_chunk: int | None = None,
    split: str = "balanced",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FlexLoRA server step: each target gets the best rank-r_i approximation of ``W = sum_k w_k B_k A_k``.

    How the singular values go onto the factors (the product, which is all Eckart-Young speaks about, is the same):
    ``split="balanced"`` puts ``sqrt(sigma)`` on each (the two factors on one scale); ``"orthonormal-a"`` puts all
    of them on B and leaves A with orthonormal rows (the FlexLoRA code's `distribute_weight_fast`). The second keeps
    LoRA's training regime: A at unit scale and B carrying the update, so the gradient on B (``s g (A x)^T``) does
    not shrink with the update; with the balanced split a small update leaves both factors at ``sqrt(sigma)``, near
    the saddle at zero, and the next round's local steps move them slowly.

    Args:
        As, Bs, weights: as in `stack_lora` (fold each client's LoRA scale s_k into its weight).
        ranks: one target rank per output (usually one per client).
        scales: LoRA scale of each output; ``scales[i] * B_i @ A_i`` is the approximation (default 1.0).
        modules_per_chunk: modules (leading-dim entries) stacked and factorised per step; default: on the CPU as
            many as keep the stacks near `CPU_CHUNK_BYTES` (cache-sized), on a GPU all at once.
        split: ``"balanced"`` or ``"orthonormal-a"`` (above).

    Returns:
        ``[(A_i [..., r_i, in], B_i [..., out, r_i]), ...]`` in the factors' dtype. Ranks above ``rank(W)``'s bound
        ``min(S, out, in)`` are zero-padded (the extra directions carry a zero singular value).
    """
    if scales is not None and len(scales) != len(ranks):
        raise ShapeError(f"flexlora_redistribute: {len(scales)} scales for {len(ranks)} ranks")
    for i, r in enumerate(ranks):
        if int(r) != r or r < 0:
            raise RankError(f"flexlora_redistribute: target {i} has rank {r!r}; ranks must be non-negative integers")
    out_scales = [1.0] * len(ranks) if scales is None else [float(x) for x in scales]
    for i, sc in enumerate(out_scales):
        if not sc > 0 or not math.isfinite(sc):
            raise ConfigError(f"flexlora_redistribute: scale of target {i} must be positive, got {sc!r}")
    if modules_per_chunk is not None and (isinstance(modules_per_chunk, bool) or int(modules_per_chunk) < 1):
        raise ConfigError(f"flexlora_redistribute: modules_per_chunk must be >= 1, got {modules_per_chunk!r}")
    if split not in SPLITS:
        raise ConfigError(f"flexlora_redistribute: split must be one of {SPLITS}, got {split!r}")
    _check_pairs(As, Bs)
    A0, B0 = As[0], Bs[0]
    lead, n_in, n_out = A0.shape[:-2], A0.shape[-1], B0.shape[-2]
    n_mod = math.prod(lead)
    S = sum(A.shape[-2] for A in As)
    K = min(S, n_in, n_out)
    kmax = min(max((int(r) for r in ranks), default=0), K)
    w = _weights_tensor(weights, len(As), A0)
    if w.dim() == 2 and w.shape[1] != n_mod:
        raise ShapeError(f"flexlora_redistribute: per-module weights {tuple(w.shape)} for {n_mod} modules")
    flat_As = [A.reshape(n_mod, A.shape[-2], n_in) for A in As]
    flat_Bs = [B.reshape(n_mod, n_out, B.shape[-1]) for B in Bs]
    out_dtype = A0.dtype
    outs = []
    for r in map(int, ranks):
        new = torch.zeros if r > kmax else torch.empty  # zeros: the padded directions (rank(W) < r) stay zero
        outs.append((new(n_mod, r, n_in, dtype=out_dtype, device=A0.device),
                     new(n_mod, n_out, r, dtype=out_dtype, device=A0.device)))
    step = modules_per_chunk or _modules_per_chunk(n_mod, S, n_in, n_out, A0.element_size(), A0.device)
    for c0 in range(0, n_mod, int(step)):
        sl = slice(c0, min(n_mod, c0 + int(step)))
        # the stacks are temporaries: reused scratch pages instead of fresh ones (see fedkernels.ops._scratch)
        A_stack, B_stack = _stack_into([A[sl] for A in flat_As], [B[sl] for B in flat_Bs],
                                       w[:, sl] if w.dim() == 2 else w, scratch_roles=("flexlora.A", "flexlora.B"))
        U, s, Vh = _factor_svd(B_stack, A_stack, kmax, compute_dtype, None, vector_roles=("flexlora.U", "flexlora.Vh"))
        root = torch.sqrt(s) if split == "balanced" else None  # [c, kmax]
        for (A_i, B_i), r, sc in zip(outs, ranks, out_scales, strict=True):
            k = min(int(r), kmax)  # pad rows / columns (k < r) stay zero
            if root is None:  # orthonormal-a: A = Vh, B = U sigma / s
                A_i[sl, :k, :].copy_(Vh[:, :k, :])
                torch.mul(U[:, :, :k], (s[:, :k] / sc)[:, None, :], out=B_i[sl, :, :k])
            else:
                f = root[:, :k] / math.sqrt(sc)
                torch.mul(Vh[:, :k, :], f[:, :, None], out=A_i[sl, :k, :])
                torch.mul(U[:, :, :k], f[:, None, :], out=B_i[sl, :, :k])
    return [(A_i.reshape(*lead, *A_i.shape[1:]), B_i.reshape(*lead, *B_i.shape[1:])) for A_i, B_i in outs]
