"""Launch-side helpers shared by the Triton kernels (triton_lora, triton_multi_lora, triton_merge).

Torch-only (no triton import), so backend selection and tests can use them where triton is absent.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["interpreting", "dot_precision", "rank_block", "sm_count", "next_power_of_2", "TL_DOT_MIN"]

#: tl.dot needs every dimension >= 16 (smaller ranks are padded with masks up to this).
TL_DOT_MIN = 16


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run in triton's numpy interpreter (CPU tensors, fixed configs).
    Read at every call, not cached: it must match how triton itself was imported, which reads it at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype, *, allow_tf32: bool | None = None) -> str:
    """``input_precision`` of the kernels' ``tl.dot``.

    fp32 inputs get "ieee" unless TF32 is allowed: by default when torch allows it for its own matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, off by default), so the Triton path has the torch path's numerics;
    ``allow_tf32=False`` forces IEEE (merges into permanent base weights). Never TF32 under the interpreter, whose
    numpy dot has no TF32 mode to compare against. 16-bit inputs get "tf32", triton's default on NVIDIA (the
    setting only acts on fp32 operands)."""
    if dtype != torch.float32:
        return "tf32"
    allow = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    return "tf32" if allow and not interpreting() else "ieee"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1); same as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rank_block(rank: int, *, minimum: int = TL_DOT_MIN, maximum: int | None = None) -> int:
    """Rank tile BLOCK_R: ``rank`` rounded up to a power of two, at least ``minimum`` (tl.dot's 16, or a config's
    block_r) and at most ``maximum`` (a loop over rank tiles covers the rest; triton_lora caps at 64 so the fp32
    [BLOCK_T, BLOCK_R] accumulator stays in registers)."""
    block = max(minimum, next_power_of_2(rank))
    return block if maximum is None else min(maximum, block)


@functools.cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device, *, cpu: int = 16) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (132 on an H100 SXM/H200), cached per device; ``cpu`` for
    interpreter tensors, where programs run one after another and a small target keeps grids small."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return cpu
