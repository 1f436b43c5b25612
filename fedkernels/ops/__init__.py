"""Compute ops: each has a pure-torch path (CPU, any device) and Triton kernels on CUDA."""

from fedkernels.ops._backend import BACKENDS, resolve_backend, triton_available
from fedkernels.ops._scratch import release_scratch, scratch_bytes
from fedkernels.ops.factor_ops import factor_svd, flexlora_redistribute, merge_stacked, stack_lora
from fedkernels.ops.lora_linear import LoRALinearFunction, dropout_keep_mask, lora_linear

__all__ = [
    "BACKENDS",
    "LoRALinearFunction",
    "dropout_keep_mask",
    "factor_svd",
    "flexlora_redistribute",
    "lora_linear",
    "merge_stacked",
    "release_scratch",
    "resolve_backend",
    "scratch_bytes",
    "stack_lora",
    "triton_available",
]
from fedkernels.ops.multi_lora import MultiLoRAFunction, MultiLoRAMeta, build_meta, multi_lora_linear  # noqa: E402

__all__ += ["MultiLoRAFunction", "MultiLoRAMeta", "build_meta", "multi_lora_linear"]
