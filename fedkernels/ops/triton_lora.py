"""Triton kernels of the masked LoRA linear (forward and backward), ``backend="triton"`` of `lora_linear`.

Math (shapes follow peft: ``A`` is ``[R, in]``, ``B`` is ``[out, R]``; ``m`` is the 0/1 rank mask, ``s`` the scale,
``K`` the dropout keep-mask scaled by ``1/(1-p)``)::

    h  = s * ((x * K) A^T) * m                    [T, R]  fp32, the only activation saved besides x
    y  = x W^T + b + h B^T                        one GEMM: the rank-r expand is R extra K steps
    gh = s * (g B) * m                            [T, R]  fp32
    dx = g W + (gh A) * K                         one GEMM: the rank-r term is R extra K steps
    dA = gh^T (x * K)                             skinny, reduced over tokens (split over T)
    dB = g^T h                                    skinny, reduced over tokens (split over T)

The fusion is the one of ../shared/docs/kernels.md section 2: ``Y = [X | h] [W | B]^T`` and
``dX = [dY | gh] [W ; A]``: the expand costs ~R/in extra FLOPs (0.4% at in=4096, R=16) and no read-modify-write
of Y or dX (a peft layer re-reads and re-writes Y 3-4 times). The shrinks follow vLLM's ``lora_shrink`` and
S-LoRA's rank-masked loads: A rows at or above the *active rank* (highest nonzero mask index + 1) are never
loaded, and every rank loop stops there. The active rank is computed on the device (a 1-element int32
tensor the kernels load), so there is no host sync and the launch is CUDA-graph capturable.

Dropout: the Triton path draws its own keep-mask with Philox (``tl.rand(seed, t * in + k)``, 64-bit offsets)
in the shrink and regenerates it bit for bit in the dx epilogue and in dA: it is never stored. It is
self-consistent forward/backward but NOT the same mask as the torch path (`dropout_keep_mask` uses
torch's CPU/CUDA generator); both are Bernoulli(1-p)/(1-p) masks from the same seed argument.

Launch configs: a fixed config under ``TRITON_INTERPRET=1`` (tiny blocks, since the interpreter runs programs one
after another at ~30-65 ms each) and a small per-arch / per-dtype table on GPUs (`GPU_CONFIGS`, reasons in the
comments). `compile_specs` lists every (kernel, signature, constexprs) of the table for ahead-of-time
compilation (tests/ops/compile_tier).

Limits: every tensor must hold fewer than 2**31 elements (int32 offsets, as in triton's matmul tutorial).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from fedkernels.errors import BackendError, ConfigError, ShapeError
from fedkernels.ops._triton_utils import dot_precision, interpreting, rank_block, sm_count

__all__ = [
    "GEMM_CANDIDATES",
    "GPU_CONFIGS",
    "autotune_enabled",
    "gemm_candidates",
    "INTERPRETER_CONFIG",
    "KernelConfig",
    "KernelSpec",
    "TritonLoRALinearFunction",
    "compile_specs",
    "lora_linear_triton",
    "select_config",
    "triton_dropout_keep_mask",
    "SMEM_LIMIT_BYTES",
]

# Largest rank tile of the shrink and skinny kernels: their fp32 [BLOCK_T, BLOCK_R] / [BLOCK_R, BLOCK_N] accumulators
# stay in registers up to 64; higher ranks loop over rank tiles (grid axis 1).
MAX_BLOCK_R = 64

# Max dynamic shared memory per block (CUDA programming guide, "Compute capabilities" table): sm_80 (A100)
# 163 KiB of its 164 KiB/SM, sm_86/sm_89 99 KiB, sm_90 (H100) 227 KiB of its 228 KiB/SM.
SMEM_LIMIT_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b in fp32. DOT_F32 upcasts both operands (the interpreter multiplies raw bf16 bits,
    triton #11584); otherwise b is cast to a's dtype so mixed-dtype adapters still hit tensor cores."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def _lora_shrink_kernel(
    X, A, MASK, RACT, H,
    T, K, R,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_ht, stride_hr,
    scale, p_drop, inv_keep, seed,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """H[t, r] = scale * sum_k drop(X)[t, k] * A[r, k] * mask[r], fp32 out; A is read only below the active rank.

    Arguments: X [T, K] input rows; A [R, K] factor read through (stride_ar, stride_ak), so the backward passes
    B^T as A by swapping strides; MASK [R] rank mask (or any valid pointer when HAS_MASK is off); RACT [1] int32
    active rank (ranks >= it are never read); H [T, R] fp32 output. scale: the LoRA scale folded in here;
    p_drop / inv_keep = 1 / (1 - p_drop) / seed: dropout on X, regenerated from (seed, t, k) so the backward
    needs no stored mask. BLOCK_R tiles the rank (grid axis 1), BLOCK_K the reduction. DOT_F32 / PRECISION: see
    `_dot` and `dot_precision`.
    """
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    r_act = tl.load(RACT)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    r_ok = offs_r < r_act
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    # Rank tiles wholly above the active rank skip the K loop (their H columns are stored as zeros).
    k_end = tl.where(pid_r * BLOCK_R < r_act, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(X + offs_t[:, None] * stride_xt + kk[None, :] * stride_xk,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            rnd = tl.rand(seed, offs_t[:, None].to(tl.int64) * K + kk[None, :])
            x = tl.where(rnd >= p_drop, x.to(tl.float32) * inv_keep, 0.0).to(x.dtype)
        a = tl.load(A + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(x, a, acc, DOT_F32, PRECISION)
    if HAS_MASK:
        m = tl.load(MASK + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        acc = acc * m[None, :]
    acc = acc * scale
    tl.store(H + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr, acc,
             mask=t_ok[:, None] & (offs_r < R)[None, :])


@triton.jit
def _lora_fused_gemm_kernel(
    X, W, BIAS, H, LB, RACT, Y,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm, stride_hr, stride_br, stride_bn, stride_ym, stride_yn,
    p_drop, inv_keep, seed,
    HAS_BIAS: tl.constexpr, DROPOUT_EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y = X @ Wk + bias + H @ LB (H fp32 [M, R], rank loop up to the active rank, as extra K steps).

    Forward: X=x, Wk[k, n]=W[n, k], LB[r, n]=B[n, r]. Backward dx: X=g, Wk=W, H=gh, LB=A and, with dropout,
    the rank term gets its own accumulator and the regenerated keep-mask at (row, col) in the epilogue.

    Arguments: X [M, K]; W the base weight read as Wk [K, N] through (stride_wk, stride_wn); BIAS [N] (any valid
    pointer when HAS_BIAS is off); H [M, R] fp32 from the shrink kernel; LB [R, N] through (stride_br, stride_bn);
    RACT [1] int32 active rank (the rank loop stops there); Y [M, N] output in X's dtype. p_drop / inv_keep /
    seed: the keep-mask of the dx epilogue (DROPOUT_EPILOGUE). Tiles BLOCK_M x BLOCK_N over K in BLOCK_K steps,
    the rank term in BLOCK_R steps; GROUP_M groups row tiles for L2 reuse of W (the usual Triton matmul swizzle).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering (triton matmul tutorial): GROUP_M row-tiles share W column tiles while they sit in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(W + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_F32, PRECISION)

    r_act = tl.load(RACT)
    if DROPOUT_EPILOGUE:
        acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, r_act, BLOCK_R):
            rr = r0 + offs_r
            r_ok = rr < r_act
            h = tl.load(H + offs_m[:, None] * stride_hm + rr[None, :] * stride_hr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            lb = tl.load(LB + rr[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc_l = _dot(h.to(X.dtype.element_ty), lb, acc_l, DOT_F32, PRECISION)
        rnd = tl.rand(seed, offs_m[:, None].to(tl.int64) * N + offs_n[None, :])
        acc += tl.where(rnd >= p_drop, acc_l * inv_keep, 0.0)
    else:
        for r0 in range(0, r_act, BLOCK_R):
            rr = r0 + offs_r
            r_ok = rr < r_act
            h = tl.load(H + offs_m[:, None] * stride_hm + rr[None, :] * stride_hr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            lb = tl.load(LB + rr[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            # h is rounded to the input dtype, as the torch path's h: the expand runs on tensor cores.
            acc = _dot(h.to(X.dtype.element_ty), lb, acc, DOT_F32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_skinny_tn_kernel(
    P, Q, RACT, OUT,
    T, N, R, t_per_split,
    stride_pt, stride_pr, stride_qt, stride_qn, stride_os, stride_or, stride_on,
    p_drop, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[split, r, n] = sum_{t in split} P[t, r] * drop(Q)[t, n], fp32 partials (summed on the host side).

    dA: P=gh, Q=x (with dropout). dB^T: P=h, Q=g. Split over T because the output is tiny (R x N): at N=4096,
    BLOCK_N=128 there are only 32 output tiles for 132 SMs. Partials + a separate sum keep it deterministic
    (no atomics). Rank tiles above the active rank skip the T loop and store zeros.

    Arguments: P [T, R] fp32; Q [T, N]; RACT [1] int32 active rank; OUT [splits, R, N] fp32 partials, one slice
    per grid axis 2; t_per_split: rows each split reduces (a multiple of BLOCK_T). p_drop / inv_keep / seed:
    dropout regenerated on Q (the dA product). Grid (N tiles, rank tiles of BLOCK_R, splits).
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    r_act = tl.load(RACT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    n_ok = offs_n < N
    r_ok = offs_r < r_act
    t_start = pid_s * t_per_split
    t_end = tl.minimum(T, t_start + t_per_split)
    t_end = tl.where(pid_r * BLOCK_R < r_act, t_end, t_start)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + offs_t
        t_ok = tt < t_end
        p = tl.load(P + tt[None, :] * stride_pt + offs_r[:, None] * stride_pr,
                    mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        q = tl.load(Q + tt[:, None] * stride_qt + offs_n[None, :] * stride_qn,
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            rnd = tl.rand(seed, tt[:, None].to(tl.int64) * N + offs_n[None, :])
            q = tl.where(rnd >= p_drop, q.to(tl.float32) * inv_keep, 0.0).to(q.dtype)
        # p (fp32) is rounded to q's dtype, as the torch path's rank-sized operands: tensor-core dot.
        acc = _dot(p.to(q.dtype), q, acc, DOT_F32, PRECISION)
    tl.store(OUT + pid_s * stride_os + offs_r[:, None] * stride_or + offs_n[None, :] * stride_on, acc,
             mask=(offs_r < R)[:, None] & n_ok[None, :])


@triton.jit
def _keep_mask_kernel(OUT, T, N, p_drop, inv_keep, seed, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the LoRA kernels draw at (t, n): Philox ``tl.rand(seed, t * N + n) >= p``, scaled."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rnd = tl.rand(seed, offs_t[:, None].to(tl.int64) * N + offs_n[None, :])
    keep = tl.where(rnd >= p_drop, inv_keep, 0.0)
    tl.store(OUT + offs_t[:, None] * N + offs_n[None, :], keep, mask=(offs_t < T)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes of the three kernels for one (arch, dtype) bucket.

    gemm_*: the fused GEMM (forward y and backward dx). shrink_*: h and gh. skinny_*: dA and dB.
    block_r is the rank step of every rank loop; 16 is the smallest tl.dot size, so R < 16 pads with masks.
    """

    gemm_m: int
    gemm_n: int
    gemm_k: int
    gemm_warps: int
    gemm_stages: int
    shrink_t: int
    shrink_k: int
    skinny_t: int
    skinny_n: int
    small_warps: int = 4
    small_stages: int = 3
    block_r: int = 16
    group_m: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1 or (f.name not in ("gemm_stages", "small_stages") and v & (v - 1)):
                raise ConfigError(f"KernelConfig.{f.name} must be a positive power of two, got {v!r}")
        if self.block_r < 16 or self.gemm_k < 16 or self.shrink_k < 16 or self.skinny_t < 16:
            raise ConfigError(f"dot dimensions must be >= 16 (tl.dot minimum), got {self}")


# Under the interpreter every program runs serially (~30-65 ms each, kernels.md section 4): 16-wide blocks
# keep a test shape of ~40 x 50 to a handful of programs while still crossing block edges.
INTERPRETER_CONFIG = KernelConfig(
    gemm_m=16, gemm_n=16, gemm_k=16, gemm_warps=1, gemm_stages=1,
    shrink_t=16, shrink_k=16, skinny_t=16, skinny_n=16, small_warps=1, small_stages=1, group_m=2,
)

# GPU table keyed by (arch, element bytes). Pipeline shared memory of the fused GEMM is about
# stages * (BM*BK + BK*BN) * bytes on sm_90 and (stages - 1) * ... on sm_80/86 (triton 3.9 keeps one stage in
# registers there), plus small rank-loop tiles; the compile tier asserts the real `metadata.shared` under
# SMEM_LIMIT_BYTES. Measured by AOT compiles (triton 3.9, rank 16): fused GEMM 128 KiB on sm_90 bf16, 96 KiB
# sm_90 fp32, 96 KiB sm_80 bf16, 48 KiB sm_86; shrinks 20-24 KiB, skinny dA/dB 40 KiB (sm_80/90).
GPU_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    # H100: 128x128x64, 4 stages = 128 KiB of the 227 KiB; 8 warps = two warpgroups for wgmma m64.
    # Shrink (memory-bound, AI ~16 FLOP/B): 32-token tiles give 256 programs at T=8192 (~2 per SM) and
    # 128-wide K steps keep each load a full 256-B line per row.
    (90, 2): KernelConfig(128, 128, 64, 8, 4, shrink_t=32, shrink_k=128, skinny_t=64, skinny_n=128),
    (90, 4): KernelConfig(128, 128, 32, 8, 3, shrink_t=32, shrink_k=64, skinny_t=64, skinny_n=64),  # 96 KiB, tf32
    # A100: 4 stages of 128x128x64 bf16 = 3 buffers x 32 KiB = 96 KiB of 163 KiB, room for the epilogue's
    # layout-conversion scratch; 4 warps (64x64 accumulator per warp) as in triton's tuned A100 matmuls.
    (80, 2): KernelConfig(128, 128, 64, 4, 4, shrink_t=32, shrink_k=128, skinny_t=64, skinny_n=128),
    (80, 4): KernelConfig(128, 128, 32, 4, 3, shrink_t=32, shrink_k=64, skinny_t=64, skinny_n=64),  # 64 KiB, tf32
    # sm_86/89 have 99 KiB per block: 3 stages (2 buffers) of 128x64x64 bf16 / 128x64x32 fp32 = 48 KiB.
    (86, 2): KernelConfig(128, 64, 64, 4, 3, shrink_t=32, shrink_k=64, skinny_t=32, skinny_n=64),
    (86, 4): KernelConfig(128, 64, 32, 4, 3, shrink_t=32, shrink_k=32, skinny_t=32, skinny_n=64),
}


def _arch_key(capability: tuple[int, int]) -> int:
    major, minor = capability
    if major >= 9:
        return 90
    if major == 8 and minor == 0:
        return 80
    return 86


def select_config(device: torch.device, dtype: torch.dtype) -> KernelConfig:
    """Fixed config for the interpreter / CPU tensors, else the table row of this GPU's arch and dtype."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    size = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    return GPU_CONFIGS[(_arch_key(torch.cuda.get_device_capability(device)), size)]


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 dot multiplies raw bit patterns (triton #11584): upcast there only.
    return interpreting() and dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------- launchers
def _active_rank(rank_mask: torch.Tensor | None, rank: int, device: torch.device) -> torch.Tensor:
    """Highest nonzero mask index + 1, as a 1-element int32 tensor on the device (no host sync)."""
    if rank_mask is None:
        return torch.full((1,), rank, dtype=torch.int32, device=device)
    idx = torch.arange(1, rank + 1, dtype=torch.int32, device=device)
    return (idx * (rank_mask != 0)).amax().reshape(1).to(torch.int32)


def _shrink(x: torch.Tensor, a_ptr: torch.Tensor, stride_ar: int, stride_ak: int, rank: int,
            mask: torch.Tensor | None, r_act: torch.Tensor, scale: float, p: float, seed: int,
            cfg: KernelConfig) -> torch.Tensor:
    """[T, R] fp32 ``h = scale * drop(x) A^T * mask`` with A read through (stride_ar, stride_ak)."""
    T, K = x.shape
    h = torch.empty((T, rank), dtype=torch.float32, device=x.device)
    block_r = rank_block(rank, minimum=cfg.block_r, maximum=MAX_BLOCK_R)
    grid = (triton.cdiv(T, cfg.shrink_t), triton.cdiv(rank, block_r))
    _lora_shrink_kernel[grid](
        x, a_ptr, mask if mask is not None else r_act, r_act, h,
        T, K, rank,
        x.stride(0), x.stride(1), stride_ar, stride_ak, h.stride(0), h.stride(1),
        float(scale), float(p), 1.0 / (1.0 - p), int(seed),
        HAS_MASK=mask is not None, HAS_DROPOUT=p > 0.0,
        BLOCK_T=cfg.shrink_t, BLOCK_R=block_r, BLOCK_K=cfg.shrink_k,
        DOT_F32=_dot_f32(x.dtype), PRECISION=dot_precision(x.dtype),
        num_warps=cfg.small_warps, num_stages=cfg.small_stages,
    )
    return h


class FusedGemmArgs(NamedTuple):
    """Operands of one fused GEMM launch (`_lora_fused_gemm_kernel`): ``Y = X @ Wk + bias + H @ LB``."""

    x: torch.Tensor  # [M, K] rows (x forward, g for dx)
    w: torch.Tensor  # base weight, read as Wk [K, N] through (stride_wk, stride_wn)
    stride_wk: int
    stride_wn: int
    n_out: int  # N: output columns
    bias: torch.Tensor | None  # [N] or None
    h: torch.Tensor  # [M, R] fp32 shrink output
    lb: torch.Tensor  # the other factor, read as LB [R, N] through (stride_br, stride_bn)
    stride_br: int
    stride_bn: int
    r_act: torch.Tensor  # [1] int32 active rank
    p: float  # dropout probability of the dx epilogue (0: none)
    seed: int  # dropout seed


def _fused_gemm(g: FusedGemmArgs, cfg: KernelConfig) -> torch.Tensor:
    if autotune_enabled():
        cfg = _tuned_gemm_config(g, cfg)
    return _launch_fused_gemm(g, cfg)


def _launch_fused_gemm(g: FusedGemmArgs, cfg: KernelConfig) -> torch.Tensor:
    x, p = g.x, g.p
    M, K = x.shape
    y = torch.empty((M, g.n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.gemm_m) * triton.cdiv(g.n_out, cfg.gemm_n),)
    _lora_fused_gemm_kernel[grid](
        x, g.w, g.bias if g.bias is not None else y, g.h, g.lb, g.r_act, y,
        M, g.n_out, K,
        x.stride(0), x.stride(1), g.stride_wk, g.stride_wn, g.h.stride(0), g.h.stride(1), g.stride_br, g.stride_bn,
        y.stride(0), y.stride(1),
        float(p), 1.0 / (1.0 - p), int(g.seed),
        HAS_BIAS=g.bias is not None, DROPOUT_EPILOGUE=p > 0.0,
        BLOCK_M=cfg.gemm_m, BLOCK_N=cfg.gemm_n, BLOCK_K=cfg.gemm_k, BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m,
        DOT_F32=_dot_f32(x.dtype), PRECISION=dot_precision(x.dtype),
        num_warps=cfg.gemm_warps, num_stages=cfg.gemm_stages,
    )
    return y


# ----------------------------------------------------------------------------------------------------- autotune
# Opt-in (FEDKERNELS_TRITON_AUTOTUNE=1) tuning of the fused GEMM's tile, our own loop instead of @triton.autotune
# (which fails at launch under the interpreter, kernels.md section 4). Candidates per arch (2-byte dtypes) span
# the usual Triton matmul shapes; each is compiled for its arch in the compile tier (smem checked). Timed once per
# (device, dtype, M bucket, N, K, dropout epilogue) on the real inputs; the fused GEMM only writes its own output,
# so running it several times has no side effect.
GEMM_CANDIDATES: dict[int, list[tuple[int, int, int, int, int]]] = {  # (BM, BN, BK, warps, stages)
    90: [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)],
    80: [(128, 128, 64, 4, 3), (128, 256, 32, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)],
    86: [(128, 64, 64, 4, 2), (64, 64, 64, 4, 3), (128, 128, 32, 8, 2)],
}
_TUNED: dict[tuple, KernelConfig] = {}


def autotune_enabled() -> bool:
    return os.environ.get("FEDKERNELS_TRITON_AUTOTUNE") == "1"


def gemm_candidates(device: torch.device, dtype: torch.dtype) -> list[KernelConfig]:
    """Configs the tuner tries: the table row first, then the arch's GEMM_CANDIDATES (16-bit dtypes only)."""
    base = select_config(device, dtype)
    if interpreting() or device.type != "cuda":
        return [base, dataclasses.replace(base, gemm_m=32, gemm_n=32)]
    if dtype == torch.float32:
        return [base]
    arch = _arch_key(torch.cuda.get_device_capability(device))
    extra = [dataclasses.replace(base, gemm_m=m, gemm_n=n, gemm_k=k, gemm_warps=w, gemm_stages=st)
             for m, n, k, w, st in GEMM_CANDIDATES[arch]]
    return [base, *[c for c in extra if c != base]]


def _bench_ms(fn) -> float:
    if torch.cuda.is_available() and not interpreting():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _tuned_gemm_config(g: FusedGemmArgs, default: KernelConfig) -> KernelConfig:
    x = g.x
    key = (str(x.device), x.dtype, triton.next_power_of_2(x.shape[0]), g.n_out, x.shape[1], g.p > 0.0)
    if key not in _TUNED:
        timings = [(_bench_ms(lambda c=c: _launch_fused_gemm(g, c)), i, c)
                   for i, c in enumerate(gemm_candidates(x.device, x.dtype))]
        _TUNED[key] = min(timings)[2] if timings else default
    return dataclasses.replace(default, **{f: getattr(_TUNED[key], f) for f in
                                           ("gemm_m", "gemm_n", "gemm_k", "gemm_warps", "gemm_stages")})


def _num_splits(T: int, out_tiles: int, cfg: KernelConfig, device: torch.device) -> int:
    t_tiles = triton.cdiv(T, cfg.skinny_t)
    if device.type != "cuda":
        return min(2, t_tiles)  # interpreter: two splits exercise the partial-sum path at no real cost
    sms = sm_count(device)
    return max(1, min(t_tiles, triton.cdiv(2 * sms, max(out_tiles, 1))))  # ~2 programs per SM


def _skinny_tn(pmat: torch.Tensor, q: torch.Tensor, rank: int, r_act: torch.Tensor, p: float, seed: int,
               cfg: KernelConfig) -> torch.Tensor:
    """[R, N] fp32 = pmat^T drop(q), reduced over all T rows."""
    T, N = q.shape
    block_r = rank_block(rank, minimum=cfg.block_r, maximum=MAX_BLOCK_R)
    n_tiles, r_tiles = triton.cdiv(N, cfg.skinny_n), triton.cdiv(rank, block_r)
    splits = _num_splits(T, n_tiles * r_tiles, cfg, q.device)
    t_per_split = triton.cdiv(triton.cdiv(T, splits), cfg.skinny_t) * cfg.skinny_t
    splits = triton.cdiv(T, t_per_split)
    part = torch.empty((splits, rank, N), dtype=torch.float32, device=q.device)
    _lora_skinny_tn_kernel[(n_tiles, r_tiles, splits)](
        pmat, q, r_act, part,
        T, N, rank, t_per_split,
        pmat.stride(0), pmat.stride(1), q.stride(0), q.stride(1), part.stride(0), part.stride(1), part.stride(2),
        float(p), 1.0 / (1.0 - p), int(seed),
        HAS_DROPOUT=p > 0.0,
        BLOCK_T=cfg.skinny_t, BLOCK_R=block_r, BLOCK_N=cfg.skinny_n,
        DOT_F32=_dot_f32(q.dtype), PRECISION=dot_precision(q.dtype),
        num_warps=cfg.small_warps, num_stages=cfg.small_stages,
    )
    return part[0] if splits == 1 else part.sum(0)  # fixed-order sum: deterministic


def triton_dropout_keep_mask(shape: tuple[int, int], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """fp32 ``[T, in]`` keep-mask (0 or ``1/(1-p)``) that the Triton path applies for (p, seed).

    The kernels regenerate it tile by tile and never store it; this materialises it for tests and debugging.
    """
    T, N = shape
    out = torch.empty((T, N), dtype=torch.float32, device=device)
    grid = (triton.cdiv(T, 16), triton.cdiv(N, 16))
    _keep_mask_kernel[grid](out, T, N, float(p), 1.0 / (1.0 - p), int(seed), BLOCK_T=16, BLOCK_N=16)
    return out


class TritonLoRALinearFunction(torch.autograd.Function):
    """Autograd function of the Triton path; same contract as `LoRALinearFunction` (2-D x).

    Saves x (only when dA or dW is needed) and the fp32 ``h = s * ((x*K) A^T) * m`` [T, R] (only when dB is
    needed); the parameters are alive anyway; the dropout mask is regenerated from the seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, rank_mask, dropout_p, dropout_seed):
        cfg = select_config(x.device, x.dtype)
        rank = lora_A.shape[0]
        r_act = _active_rank(rank_mask, rank, x.device)
        seed = int(dropout_seed) if dropout_p > 0.0 else 0
        h = _shrink(x, lora_A, lora_A.stride(0), lora_A.stride(1), rank, rank_mask, r_act, scale, dropout_p, seed,
                    cfg)
        # y = x W^T + b + h B^T: Wk[k, n] = W[n, k], LB[r, n] = B[n, r].
        y = _fused_gemm(FusedGemmArgs(x=x, w=weight, stride_wk=weight.stride(1), stride_wn=weight.stride(0),
                                      n_out=weight.shape[0], bias=bias, h=h, lb=lora_B, stride_br=lora_B.stride(1),
                                      stride_bn=lora_B.stride(0), r_act=r_act, p=0.0, seed=0), cfg)
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_A, lora_B,
                              h if need_b else None, rank_mask, r_act)
        ctx.scale, ctx.p, ctx.seed = float(scale), float(dropout_p), seed
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_A, lora_B, h, rank_mask, r_act = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = g.contiguous()
        cfg = select_config(g.device, g.dtype)
        rank = lora_A.shape[0]
        dx = dW = dbias = dA = dB = None
        gh = None
        if need_x or need_a:
            # gh = s * (g B) * m: B read as [R, out] (stride_ar = B.stride(1)).
            gh = _shrink(g, lora_B, lora_B.stride(1), lora_B.stride(0), rank, rank_mask, r_act, ctx.scale, 0.0, 0,
                         cfg)
        if need_x:
            # dx = g W + (gh A) * K: Wk = W [out, in] as is, LB = A [R, in].
            dx = _fused_gemm(FusedGemmArgs(x=g, w=weight, stride_wk=weight.stride(0), stride_wn=weight.stride(1),
                                           n_out=weight.shape[1], bias=None, h=gh, lb=lora_A,
                                           stride_br=lora_A.stride(0), stride_bn=lora_A.stride(1), r_act=r_act,
                                           p=ctx.p, seed=ctx.seed), cfg)
        if need_a:
            dA = _skinny_tn(gh, x, rank, r_act, ctx.p, ctx.seed, cfg).to(lora_A.dtype)
        if need_b:
            dB = _skinny_tn(h, g, rank, r_act, 0.0, 0, cfg).t().to(lora_B.dtype)
        if need_w:
            dW = (g.t() @ x).to(weight.dtype)  # trainable base weight: rare, plain torch
        if need_bias:
            dbias = g.float().sum(0).to(g.dtype)
        return dx, dW, dbias, dA, dB, None, None, None, None


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    rank_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Triton masked LoRA linear on 2-D ``x`` ``[T, in]`` (`lora_linear` flattens leading dims first).

    Raises:
        BackendError: tensors on CPU without ``TRITON_INTERPRET=1``, or on different devices.
        ShapeError: x is not 2-D, or a tensor has 2**31 elements or more (int32 offsets).
    """
    tensors = [t for t in (x, weight, bias, lora_A, lora_B, rank_mask) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise BackendError(f"triton backend needs every tensor on one device; x is on {x.device}, got "
                           f"{sorted({str(t.device) for t in tensors})}")
    if x.device.type != "cuda" and not interpreting():
        raise BackendError(f"backend='triton' on {x.device} tensors needs TRITON_INTERPRET=1 set before triton is "
                           "imported (CPU kernels run only in the interpreter); use backend='torch' or 'auto'")
    if x.dim() != 2:
        raise ShapeError(f"lora_linear_triton expects 2-D x [T, in], got {tuple(x.shape)}")
    big = [tuple(t.shape) for t in (x, weight) if t.numel() >= 2**31]
    if big:
        raise ShapeError(f"triton backend uses int32 offsets; tensors of shape {big} have >= 2**31 elements")
    if dropout_p > 0.0 and dropout_seed is None:
        raise ConfigError(f"dropout_p={dropout_p!r} needs a dropout_seed")
    if x.shape[0] == 0:
        # No tokens: nothing to launch; torch ops on empty tensors keep autograd's zero gradients.
        return torch.nn.functional.linear(x, weight, bias) + (x @ lora_A.t()) @ lora_B.t() * scale
    return TritonLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), rank_mask,
                                          float(dropout_p), dropout_seed)


# ----------------------------------------------------------------------------------------------------- AOT specs
@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One ahead-of-time compilation unit: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget("cuda", arch, 32), options={"num_warps": ..., "num_stages": ...})``."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list]
    num_warps: int
    num_stages: int


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(name, fn, types: dict[str, str], constexprs: dict[str, Any], aligned: set[str], warps, stages):
    """Full signature in the kernel's argument order; unit strides as constexpr 1 and 16-byte alignment of
    pointers / other strides, as the JIT specialises them for contiguous tensors at runtime."""
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        else:
            sig[arg] = types[arg]
            if arg in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return KernelSpec(name, fn, sig, constexprs, attrs, warps, stages)


def compile_specs(arch: int = 90, dtype: torch.dtype = torch.bfloat16, rank: int = 16,
                  dropout: bool = False, precision: str = "tf32",
                  config: KernelConfig | None = None) -> list[KernelSpec]:
    """Every kernel launch of forward + backward with the `GPU_CONFIGS` row of ``arch`` (80, 86 or 90).

    ``precision`` is the fp32 dot mode: "tf32" (tensor cores) or "ieee" (what fp32 inputs get when
    ``torch.backends.cuda.matmul.allow_tf32`` is off, torch's default); ignored for 16-bit dtypes.
    ``config`` overrides the table row (the compile tier passes each autotune candidate).
    """
    if precision not in ("tf32", "ieee"):
        raise ConfigError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    if config is None:
        config = GPU_CONFIGS[(_arch_key((arch // 10, arch % 10)), 2 if dtype != torch.float32 else 4)]
    cfg = config
    dt = _TRITON_DTYPE[dtype]
    prec = precision
    block_r = rank_block(rank, minimum=cfg.block_r, maximum=MAX_BLOCK_R)
    p = {"p_drop": "fp32", "inv_keep": "fp32", "seed": "i64"}
    specs = []
    shrink_types = {"X": f"*{dt}", "A": f"*{dt}", "MASK": f"*{dt}", "RACT": "*i32", "H": "*fp32",
                    "T": "i32", "K": "i32", "R": "i32", "stride_xt": "i32", "stride_ak": "i32", "stride_ar": "i32",
                    "stride_ht": "i32", "scale": "fp32", **p}
    for name, ck, extra in (("shrink_fwd", {"stride_ak": 1}, dropout), ("shrink_gh", {"stride_ar": 1}, False)):
        ce = {"stride_xk": 1, "stride_hr": 1, **ck, "HAS_MASK": True, "HAS_DROPOUT": extra,
              "BLOCK_T": cfg.shrink_t, "BLOCK_R": block_r, "BLOCK_K": cfg.shrink_k, "DOT_F32": False,
              "PRECISION": prec}
        specs.append(_spec(name, _lora_shrink_kernel, shrink_types, ce,
                           {"X", "A", "H", "stride_xt", "stride_ar", "stride_ak", "stride_ht", "K"},
                           cfg.small_warps, cfg.small_stages))
    gemm_types = {"X": f"*{dt}", "W": f"*{dt}", "BIAS": f"*{dt}", "H": "*fp32", "LB": f"*{dt}", "RACT": "*i32",
                  "Y": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wk": "i32",
                  "stride_wn": "i32", "stride_hm": "i32", "stride_br": "i32", "stride_bn": "i32", "stride_ym": "i32",
                  **p}
    base = {"stride_xk": 1, "stride_hr": 1, "stride_yn": 1, "BLOCK_M": cfg.gemm_m, "BLOCK_N": cfg.gemm_n,
            "BLOCK_K": cfg.gemm_k, "BLOCK_R": cfg.block_r, "GROUP_M": cfg.group_m, "DOT_F32": False,
            "PRECISION": prec}
    aligned = {"X", "W", "H", "LB", "Y", "N", "K", "stride_xm", "stride_wk", "stride_wn", "stride_hm",
               "stride_br", "stride_bn", "stride_ym"}
    specs.append(_spec("gemm_fwd", _lora_fused_gemm_kernel, gemm_types,
                       {**base, "stride_wk": 1, "stride_br": 1, "HAS_BIAS": True, "DROPOUT_EPILOGUE": False},
                       aligned, cfg.gemm_warps, cfg.gemm_stages))
    specs.append(_spec("gemm_dx", _lora_fused_gemm_kernel, gemm_types,
                       {**base, "stride_wn": 1, "stride_bn": 1, "HAS_BIAS": False, "DROPOUT_EPILOGUE": dropout},
                       aligned, cfg.gemm_warps, cfg.gemm_stages))
    skinny_types = {"P": "*fp32", "Q": f"*{dt}", "RACT": "*i32", "OUT": "*fp32", "T": "i32", "N": "i32", "R": "i32",
                    "t_per_split": "i32", "stride_pt": "i32", "stride_qt": "i32", "stride_os": "i32",
                    "stride_or": "i32", **p}
    for name, extra in (("skinny_dA", dropout), ("skinny_dB", False)):
        ce = {"stride_pr": 1, "stride_qn": 1, "stride_on": 1, "HAS_DROPOUT": extra, "BLOCK_T": cfg.skinny_t,
              "BLOCK_R": block_r, "BLOCK_N": cfg.skinny_n, "DOT_F32": False, "PRECISION": prec}
        specs.append(_spec(name, _lora_skinny_tn_kernel, skinny_types, ce,
                           {"P", "Q", "OUT", "N", "stride_pt", "stride_qt", "stride_os", "stride_or"},
                           cfg.small_warps, cfg.small_stages))
    return specs
