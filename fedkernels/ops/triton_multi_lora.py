"""Triton kernels of the multi-client LoRA linear (forward and backward), segmented by client.

Structure follows punica's SGMV (Chen et al. 2023) and vLLM ``lora/ops/triton_ops/{lora_shrink,lora_expand}``:
tokens are grouped by client once per batch (`fedkernels.ops.multi_lora.build_meta`), every kernel's grid
has one axis over the active segments, programs gather their token rows through the sorted permutation,
load their client's rank r_c and scale s_c at runtime and mask the rank axis with ``offs_r < r_c``
(S-LoRA's per-adapter rank), and programs past their segment's end exit at once. Clients without tokens
have no segment, so they cost nothing. Three kernels serve the five products:

    _seg_shrink_kernel  OUT[t, :] = s? * X[perm[t]] W_c^T        forward h = x A_c^T; backward gh = s g B_c
    _seg_expand_kernel  Y[perm[t]] += s? * P[t] W_c^T            forward y += s h B_c^T; backward dx += gh A_c
    _seg_grad_kernel    G_c = s? * P[S_c]^T Q[perm[S_c]]         dA_c = gh^T x, dB_c^T = s h^T g (per segment)

The base GEMM (``x W^T`` and ``g W``) stays in cuBLAS (``F.linear``): unlike the single-client kernel it
is shared by tokens of every client, and the expand adds into y rows of one client only, so it is a
read-modify-write of y: one extra pass over Y (40 us at T=8192, d=4096, bf16 on an H100 SXM,
kernels.md section 2).

Determinism: ``_seg_shrink_kernel`` may split the K reduction (split-K, as vLLM's shrink) and
``_seg_grad_kernel`` the token reduction (split-T) for parallelism. Default mode combines splits with
``tl.atomic_add`` on an fp32 buffer (order depends on scheduling); ``deterministic=True`` writes each
split's partial sum to its own slice of an fp32 buffer and sums the slices in a fixed order (vLLM's
batch-invariant split-K idea), so every run is bitwise identical. Without splits both modes are atomic-free.

Interpreter (``TRITON_INTERPRET=1``): every launch here uses a fixed config (autotune does not run
without a driver, kernels.md section 4); bf16 ``tl.dot`` is wrong in the interpreter, so tests use fp32/fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fedkernels.errors import ConfigError, RankError
from fedkernels.ops._triton_utils import dot_precision, interpreting, rank_block, sm_count
from fedkernels.ops.multi_lora import MultiLoRAMeta

__all__ = [
    "MultiLoRAConfig",
    "INTERPRETER_CONFIG",
    "GPU_CONFIGS",
    "pick_config",
    "block_r",
    "multi_lora_linear_triton",
    "shrink",
    "expand",
    "segment_grad",
]

MAX_RANK = 256  # the grad kernel keeps a [BLOCK_R, BLOCK_N] fp32 accumulator in registers


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _seg_shrink_kernel(
    X, W, OUT, PERM, SEG_CLIENT, SEG_START, SEG_LEN, RANKS, SCALES,
    K_DIM, R_TOTAL,
    sx_t, sx_k, sw_c, sw_r, sw_k, so_split, so_t, so_r,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
    ATOMIC: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[start+m, r] (+)= s * sum_k X[perm[start+m], k] * W[c, r, k] for r < r_c, one tile of one segment."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_tok = tl.load(SEG_LEN + pid_s)
    if pid_m * BLOCK_M >= n_tok:
        return  # the grid is sized for the longest segment; shorter ones exit here
    c = tl.load(SEG_CLIENT + pid_s).to(tl.int64)
    start = tl.load(SEG_START + pid_s)
    r_c = tl.load(RANKS + c)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tok
    rows = tl.load(PERM + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r_c
    # split-K: program pid_k reduces over its own chunk of whole BLOCK_K steps
    k_per = tl.cdiv(tl.cdiv(K_DIM, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K_DIM)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(X + rows[:, None] * sx_t + offs_k[None, :] * sx_k, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(W + c * sw_c + offs_r[None, :] * sw_r + offs_k[:, None] * sw_k,
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(SCALES + c)
    out_rows = (start + offs_m).to(tl.int64)
    ptrs = OUT + out_rows[:, None] * so_t + offs_r[None, :] * so_r
    mask = m_mask[:, None] & (offs_r[None, :] < R_TOTAL)
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs + pid_k * so_split, acc, mask=mask)


@triton.jit
def _seg_expand_kernel(
    P, W, Y, PERM, SEG_CLIENT, SEG_START, SEG_LEN, RANKS, SCALES,
    N_DIM,
    sp_t, sp_r, sw_c, sw_n, sw_r, sy_t, sy_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y[perm[start+m], n] += s * sum_{r < r_c} P[start+m, r] * W[c, n, r] (every row of Y belongs to one
    segment, so no two programs touch the same element: no atomics, deterministic)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_tok = tl.load(SEG_LEN + pid_s)
    if pid_m * BLOCK_M >= n_tok:
        return
    c = tl.load(SEG_CLIENT + pid_s).to(tl.int64)
    start = tl.load(SEG_START + pid_s)
    r_c = tl.load(RANKS + c)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tok
    rows = tl.load(PERM + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_DIM
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r_c
    p_rows = (start + offs_m).to(tl.int64)
    p = tl.load(P + p_rows[:, None] * sp_t + offs_r[None, :] * sp_r, mask=m_mask[:, None] & r_mask[None, :],
                other=0.0)
    w = tl.load(W + c * sw_c + offs_n[None, :] * sw_n + offs_r[:, None] * sw_r,
                mask=n_mask[None, :] & r_mask[:, None], other=0.0)
    # P is the fp32 rank-sized intermediate; it is rounded to the weights' dtype for the tensor-core dot,
    # as the torch path keeps h in x's dtype.
    acc = tl.dot(p.to(w.dtype), w, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(SCALES + c)
    y_ptrs = Y + rows[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@triton.jit
def _seg_grad_kernel(
    P, Q, OUT, PERM, SEG_CLIENT, SEG_START, SEG_LEN, RANKS, SCALES,
    N_DIM, R_TOTAL,
    sp_t, sp_r, sq_t, sq_n, so_split, so_s, so_r, so_n,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_T: tl.constexpr,
    ATOMIC: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[seg, r, n] (+)= s * sum_{t in segment} P[t, r] * Q[perm[t], n]: a client's adapter gradient is a
    reduction over that client's tokens only (dA_c = gh_c^T x_c, dB_c^T = s h_c^T g_c)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    n_tok = tl.load(SEG_LEN + pid_s)
    c = tl.load(SEG_CLIENT + pid_s).to(tl.int64)
    start = tl.load(SEG_START + pid_s)
    r_c = tl.load(RANKS + c)
    t_per = tl.cdiv(tl.cdiv(n_tok, BLOCK_T), SPLIT_T) * BLOCK_T
    t_lo = pid_t * t_per
    t_hi = tl.minimum(t_lo + t_per, n_tok)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_DIM
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r_c
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    # tokens in ascending order inside a split: a fixed summation order
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_hi
        rows = tl.load(PERM + start + offs_t, mask=t_mask, other=0).to(tl.int64)
        p_rows = (start + offs_t).to(tl.int64)
        p = tl.load(P + p_rows[:, None] * sp_t + offs_r[None, :] * sp_r, mask=t_mask[:, None] & r_mask[None, :],
                    other=0.0)
        q = tl.load(Q + rows[:, None] * sq_t + offs_n[None, :] * sq_n, mask=t_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(p.to(q.dtype)), q, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(SCALES + c)
    ptrs = OUT + pid_s * so_s + offs_r[:, None] * so_r + offs_n[None, :] * so_n
    mask = (offs_r[:, None] < R_TOTAL) & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs + pid_t * so_split, acc, mask=mask)


KERNELS = {"shrink": _seg_shrink_kernel, "expand": _seg_expand_kernel, "grad": _seg_grad_kernel}


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MultiLoRAConfig:
    """Tile sizes of the three kernels (BLOCK_R is derived from the max rank, see `block_r`).

    Args:
        shrink_m, shrink_k: token and reduction tiles of the shrink; shrink_split: max split-K factor.
        expand_m, expand_n: token and output-feature tiles of the expand.
        grad_t, grad_n: token (reduction) and feature tiles of the adapter-gradient kernel; grad_split:
            max split-T factor.
        num_warps, num_stages: launch options (ignored by the interpreter).
    """

    shrink_m: int = 64
    shrink_k: int = 64
    shrink_split: int = 8
    expand_m: int = 64
    expand_n: int = 128
    grad_t: int = 64
    grad_n: int = 128
    grad_split: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("shrink_m", "shrink_k", "expand_m", "expand_n", "grad_t", "grad_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ConfigError(f"MultiLoRAConfig.{name} must be a power of two >= 16 (tl.dot), got {v!r}")
        for name in ("shrink_split", "grad_split", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MultiLoRAConfig.{name} must be >= 1, got {getattr(self, name)!r}")


# Interpreter: the smallest legal tiles (tl.dot needs 16) so tiny odd test shapes cross tile edges, and
# splits of 2 so the split-K / split-T paths (atomic and deterministic) are exercised.
INTERPRETER_CONFIG = MultiLoRAConfig(shrink_m=16, shrink_k=16, shrink_split=2, expand_m=16, expand_n=16,
                                     grad_t=16, grad_n=16, grad_split=2, num_warps=1, num_stages=1)

# GPU table keyed by max rank bucket (BLOCK_R). Not tuned on hardware (no GPU was lent to this task):
# sizes follow vLLM's defaults (shrink BM 32-64 / BK 32-256 split-K 8-64; expand 64x128) and are sized so
# every config fits sm_80's 163 KiB of shared memory with 3 stages of bf16 tiles, e.g. the largest
# grad tile (BLOCK_R=256 is handled by the 8-warp row): (64x256 + 64x64) x 2 B x 3 = 120 KiB. The
# compile tier checks shared memory and tensor-core use for each row on sm_80 and sm_90.
GPU_CONFIGS: dict[int, MultiLoRAConfig] = {
    16: MultiLoRAConfig(shrink_m=64, shrink_k=128, expand_m=64, expand_n=128, grad_t=64, grad_n=128),
    32: MultiLoRAConfig(shrink_m=64, shrink_k=128, expand_m=64, expand_n=128, grad_t=64, grad_n=128),
    64: MultiLoRAConfig(shrink_m=64, shrink_k=64, expand_m=64, expand_n=128, grad_t=64, grad_n=128),
    128: MultiLoRAConfig(shrink_m=64, shrink_k=64, expand_m=64, expand_n=64, grad_t=32, grad_n=64,
                         num_warps=8),
    256: MultiLoRAConfig(shrink_m=32, shrink_k=32, expand_m=32, expand_n=64, grad_t=32, grad_n=64,
                         num_warps=8, num_stages=2),
}


def block_r(max_rank: int) -> int:
    """Rank tile: the max rank rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    if not 1 <= max_rank <= MAX_RANK:
        raise RankError(f"the Triton multi-LoRA kernels support max rank 1..{MAX_RANK}, got {max_rank}")
    return rank_block(max_rank)


def pick_config(max_rank: int) -> MultiLoRAConfig:
    """Fixed interpreter config, or the GPU table row of this rank bucket."""
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[block_r(max_rank)]


def _split(max_split: int, programs: int, steps: int, device: torch.device) -> int:
    """Split factor: enough programs for two waves over the SMs, never more splits than loop steps."""
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return int(max(1, min(max_split, want, steps)))


# ---------------------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class _Segments:
    client: torch.Tensor  # [S] int32/int64
    start: torch.Tensor  # [S] int32
    length: torch.Tensor  # [S] int32
    clients: tuple[int, ...]
    max_len: int


def _segments(meta: MultiLoRAMeta, keep) -> _Segments | None:
    """Active segments whose client passes ``keep`` (reuses meta's tensors when all pass: no copy)."""
    idx = [i for i, c in enumerate(meta.host_active) if keep(c)]
    if not idx:
        return None
    lens = [meta.host_offsets[c + 1] - meta.host_offsets[c] for c in meta.host_active]
    if len(idx) == len(meta.host_active):
        return _Segments(meta.active_clients, meta.seg_start, meta.seg_len, meta.host_active, meta.max_seg_len)
    sel = torch.tensor(idx, dtype=torch.int64, device=meta.perm.device)
    return _Segments(meta.active_clients.index_select(0, sel), meta.seg_start.index_select(0, sel),
                     meta.seg_len.index_select(0, sel), tuple(meta.host_active[i] for i in idx),
                     max(lens[i] for i in idx))


def _sum_partials(parts: torch.Tensor) -> torch.Tensor:
    """Sum the per-split partials along dim 0 in a fixed order: bitwise reproducible (no atomics)."""
    acc = parts[0].clone()
    for i in range(1, parts.shape[0]):
        acc += parts[i]
    return acc


def shrink(
    x: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], meta: MultiLoRAMeta, segs: _Segments,
    ranks: torch.Tensor, scales: torch.Tensor | None, max_rank: int, cfg: MultiLoRAConfig, *, deterministic: bool,
) -> torch.Tensor:
    """``[T_lora, R]`` fp32: row t = s_c * x[perm[t]] W_c^T (W_c element (r, k) at ``w_strides`` (c, r, k))."""
    t_lora, k_dim = meta.num_lora_tokens, x.shape[1]
    br = block_r(max_rank)
    m_tiles = triton.cdiv(segs.max_len, cfg.shrink_m)
    split = _split(cfg.shrink_split, m_tiles * len(segs.clients), triton.cdiv(k_dim, cfg.shrink_k), x.device)
    atomic = split > 1 and not deterministic
    # zero-filled: rows of segments left out (rank 0) must read as zero; atomics accumulate into it
    shape = (split, t_lora, max_rank) if split > 1 and deterministic else (t_lora, max_rank)
    out = torch.zeros(shape, device=x.device, dtype=torch.float32)
    so_t, so_r = out.stride()[-2:]
    so_split = out.stride(0) if out.dim() == 3 else 0
    grid = (m_tiles, len(segs.clients), split)
    _seg_shrink_kernel[grid](
        x, w, out, meta.perm_i32, segs.client, segs.start, segs.length, ranks,
        scales if scales is not None else ranks, k_dim, max_rank,
        x.stride(0), x.stride(1), *w_strides, so_split, so_t, so_r,
        BLOCK_M=cfg.shrink_m, BLOCK_K=cfg.shrink_k, BLOCK_R=br, SPLIT_K=split, ATOMIC=atomic,
        HAS_SCALE=scales is not None, PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return _sum_partials(out) if out.dim() == 3 else out


def expand(
    p: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], y: torch.Tensor, meta: MultiLoRAMeta,
    segs: _Segments, ranks: torch.Tensor, scales: torch.Tensor | None, max_rank: int, cfg: MultiLoRAConfig,
) -> None:
    """In place: ``y[perm[t]] += s_c * p[t] W_c^T`` (W_c element (n, r) at ``w_strides`` (c, n, r))."""
    n_dim = y.shape[1]
    grid = (triton.cdiv(segs.max_len, cfg.expand_m), triton.cdiv(n_dim, cfg.expand_n), len(segs.clients))
    _seg_expand_kernel[grid](
        p, w, y, meta.perm_i32, segs.client, segs.start, segs.length, ranks,
        scales if scales is not None else ranks, n_dim,
        p.stride(0), p.stride(1), *w_strides, y.stride(0), y.stride(1),
        BLOCK_M=cfg.expand_m, BLOCK_N=cfg.expand_n, BLOCK_R=block_r(max_rank), HAS_SCALE=scales is not None,
        PRECISION=dot_precision(w.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def segment_grad(
    p: torch.Tensor, q: torch.Tensor, meta: MultiLoRAMeta, segs: _Segments, ranks: torch.Tensor,
    scales: torch.Tensor | None, max_rank: int, cfg: MultiLoRAConfig, *, deterministic: bool,
) -> torch.Tensor:
    """``[S, R, N]`` fp32: segment i = s_c * p[S_c]^T q[perm[S_c]] (rank rows >= r_c are zero)."""
    n_dim = q.shape[1]
    n_tiles = triton.cdiv(n_dim, cfg.grad_n)
    split = _split(cfg.grad_split, n_tiles * len(segs.clients), triton.cdiv(segs.max_len, cfg.grad_t), q.device)
    atomic = split > 1 and not deterministic
    shape = (split, len(segs.clients), max_rank, n_dim) if split > 1 and deterministic else \
        (len(segs.clients), max_rank, n_dim)
    out = torch.zeros(shape, device=q.device, dtype=torch.float32)
    so_s, so_r, so_n = out.stride()[-3:]
    so_split = out.stride(0) if out.dim() == 4 else 0
    _seg_grad_kernel[(n_tiles, len(segs.clients), split)](
        p, q, out, meta.perm_i32, segs.client, segs.start, segs.length, ranks,
        scales if scales is not None else ranks, n_dim, max_rank,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), so_split, so_s, so_r, so_n,
        BLOCK_T=cfg.grad_t, BLOCK_N=cfg.grad_n, BLOCK_R=block_r(max_rank), SPLIT_T=split, ATOMIC=atomic,
        HAS_SCALE=scales is not None, PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return _sum_partials(out) if out.dim() == 4 else out


# ---------------------------------------------------------------------------------------------- autograd
class MultiLoRATritonFunction(torch.autograd.Function):
    """Same math and backward as `fedkernels.ops.multi_lora.MultiLoRAFunction`; products run in the kernels.

    Saved: x (when dA is needed), the fp32 ``h`` ``[T_lora, R]`` in sorted order, and the small adapter
    tensors. The backward runs, per trainable segment: gh = s g B (shrink), dx += gh A (expand),
    dA = gh^T x and dB^T = s h^T g (grad kernel), all over sorted rows gathered through ``perm``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, meta, scales, ranks, trainable, deterministic, cfg):
        x = x.contiguous()
        y = F.linear(x, weight, bias).contiguous()
        dev = x.device
        max_r = lora_A.shape[1]
        ranks_t = torch.tensor(ranks, dtype=torch.int32, device=dev)
        scales_t = torch.tensor(scales, dtype=torch.float32, device=dev)
        segs = _segments(meta, lambda c: ranks[c] > 0)
        h = None
        if segs is not None:
            sa = lora_A.stride()
            h = shrink(x, lora_A, (sa[0], sa[1], sa[2]), meta, segs, ranks_t, None, max_r, cfg,
                       deterministic=deterministic)
            sb = lora_B.stride()
            expand(h, lora_B, (sb[0], sb[1], sb[2]), y, meta, segs, ranks_t, scales_t, max_r, cfg)
        need_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_x else None, weight, lora_A, lora_B, h, ranks_t, scales_t)
        ctx.meta, ctx.ranks, ctx.trainable, ctx.deterministic, ctx.cfg = meta, ranks, trainable, deterministic, cfg
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_A, lora_B, h, ranks_t, scales_t = ctx.saved_tensors
        meta, ranks, trainable, det, cfg = ctx.meta, ctx.ranks, ctx.trainable, ctx.deterministic, ctx.cfg
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        need_a = need_a and any(trainable)
        need_bb = need_bb and any(trainable)
        g = g.contiguous()
        max_r = lora_A.shape[1]
        dx = dW = db = dA = dB = None
        if need_a:
            dA = torch.zeros_like(lora_A)
        if need_bb:
            dB = torch.zeros_like(lora_B)
        if need_x:
            dx = (g @ weight).contiguous()
        sa, sb = lora_A.stride(), lora_B.stride()
        segs_x = _segments(meta, lambda c: ranks[c] > 0) if need_x else None
        segs_t = _segments(meta, lambda c: ranks[c] > 0 and trainable[c]) if (need_a or need_bb) else None
        if segs_x is not None or segs_t is not None:
            # gh = s_c g[S_c] B_c: B_c element (r, k=out) at (c, r, k) strides (sb0, sb2, sb1)
            segs_gh = segs_x if segs_x is not None else segs_t
            gh = shrink(g, lora_B, (sb[0], sb[2], sb[1]), meta, segs_gh, ranks_t, scales_t, max_r, cfg,
                        deterministic=det)
            if segs_x is not None:
                # dx[perm] += gh A_c: A_c element (n=in, r) at (c, n, r) strides (sa0, sa2, sa1)
                expand(gh, lora_A, (sa[0], sa[2], sa[1]), dx, meta, segs_x, ranks_t, None, max_r, cfg)
            if segs_t is not None:
                sel = torch.tensor(segs_t.clients, dtype=torch.int64, device=g.device)
                if need_a:
                    ga = segment_grad(gh, x.contiguous(), meta, segs_t, ranks_t, None, max_r, cfg, deterministic=det)
                    dA.index_copy_(0, sel, ga.to(dA.dtype))
                if need_bb:
                    gb = segment_grad(h, g, meta, segs_t, ranks_t, scales_t, max_r, cfg, deterministic=det)
                    dB.index_copy_(0, sel, gb.transpose(1, 2).to(dB.dtype))
        if need_w:
            dW = g.T @ x
        if need_b:
            db = g.sum(0)
        return dx, dW, db, dA, dB, None, None, None, None, None, None


def multi_lora_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    meta: MultiLoRAMeta, scales: list[float], ranks: list[int], trainable: list[bool], *,
    deterministic: bool = False, config: MultiLoRAConfig | None = None,
) -> torch.Tensor:
    """Triton path of `fedkernels.ops.multi_lora_linear` (arguments already validated there); x is ``[T, in]``."""
    cfg = config if config is not None else pick_config(lora_A.shape[1])
    return MultiLoRATritonFunction.apply(x, weight, bias, lora_A, lora_B, meta, scales, ranks, trainable,
                                         bool(deterministic), cfg)
