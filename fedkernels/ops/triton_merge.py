"""Triton kernel of `fedkernels.ops.merge_stacked`: ``W[m] += scale * B_stack[m] @ A_stack[m]`` in place.

One launch for all ``M`` modules of equal shape: grid ``(cdiv(out, BM) * cdiv(in, BN), M)``. Each program
reads its W tile once, accumulates ``B[m, tile, :] @ A[m, :, tile]`` in fp32 over S in BK steps (S = sum of client
ranks, <= 512 for 10 clients at r <= 64, so 1-32 steps), and writes the tile back: the op moves ``2 out in``
bytes of W plus the small factors, i.e. it is bandwidth-bound like a `torch.add` of the dense product but never
materialises that product (a per-client loop of ``W += s B_i A_i`` reads and writes W once per client).
fp32 factors use ``input_precision="ieee"`` by default: merged base weights are permanent, TF32's 10-bit
mantissa (~1e-3 relative) would accumulate over rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedkernels.ops._triton_utils import dot_precision

__all__ = ["merge_stacked_triton", "merge_kernel", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


@triton.jit
def merge_kernel(
    w_ptr, a_ptr, b_ptr,
    OUT, IN, S,
    stride_wm, stride_wo, stride_wi,
    stride_am, stride_as, stride_ai,
    stride_bm, stride_bo, stride_bs,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of ``W[m] += scale * B[m] @ A[m]``.

    Arguments: w_ptr W [M, OUT, IN] (updated in place, any float dtype); a_ptr A_stack [M, S, IN] and b_ptr
    B_stack [M, OUT, S], already in W's dtype; S the stacked rank, reduced in BLOCK_K steps; the stride triples
    follow the tensors' (module, row, column) order; scale the stacked scale (1.0 for FLoRA, the client scales are
    folded into A). Grid axis 0: output tiles, axis 1: module m. PRECISION: `dot_precision` ("ieee" for fp32 merges
    by default).
    """
    pid = tl.program_id(0)
    mod = tl.program_id(1).to(tl.int64)
    n_tiles_n = tl.cdiv(IN, BLOCK_N)
    pid_o = pid // n_tiles_n
    pid_i = pid % n_tiles_n
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # tile pointers at k = 0, advanced by BLOCK_K ranks per step (S is small: 1-32 steps)
    b_tile = b_ptr + mod * stride_bm + offs_o[:, None] * stride_bo + offs_k[None, :] * stride_bs
    a_tile = a_ptr + mod * stride_am + offs_k[:, None] * stride_as + offs_i[None, :] * stride_ai
    for k0 in range(0, S, BLOCK_K):
        in_s = (k0 + offs_k) < S
        b = tl.load(b_tile, mask=mask_o[:, None] & in_s[None, :], other=0.0)
        a = tl.load(a_tile, mask=in_s[:, None] & mask_i[None, :], other=0.0)
        acc += tl.dot(b, a, input_precision=PRECISION)
        b_tile += BLOCK_K * stride_bs
        a_tile += BLOCK_K * stride_as
    w_ptrs = w_ptr + mod * stride_wm + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
    mask = mask_o[:, None] & mask_i[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    res = w.to(tl.float32) + scale * acc
    tl.store(w_ptrs, res.to(w_ptr.dtype.element_ty), mask=mask)


def merge_stacked_triton(
    weight: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    scale: float,
    *,
    config: dict[str, int] | None = None,
    ieee: bool = True,
) -> torch.Tensor:
    """Launch `merge_kernel` (shapes already checked by `merge_stacked`); returns ``weight`` modified in place.

    The factors are cast to the weight's dtype first (one dtype per dot; fp16/bf16 weights then use tensor cores).
    """
    cfg = dict(DEFAULT_CONFIG if config is None else config)
    M, OUT, IN = weight.shape
    S = A_stack.shape[1]
    A = A_stack.to(weight.dtype)
    B = B_stack.to(weight.dtype)
    grid = (triton.cdiv(OUT, cfg["BLOCK_M"]) * triton.cdiv(IN, cfg["BLOCK_N"]), M)
    merge_kernel[grid](
        weight, A, B,
        OUT, IN, S,
        weight.stride(0), weight.stride(1), weight.stride(2),
        A.stride(0), A.stride(1), A.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        float(scale),
        PRECISION=dot_precision(weight.dtype, allow_tf32=not ieee),
        **cfg,
    )
    return weight
