"""Backend selection shared by every op: "torch" (CPU/any device), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1) and "auto" (triton on CUDA tensors when the kernels import, torch otherwise)."""

from __future__ import annotations

import functools
import os

import torch

from fedkernels.errors import BackendError

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when triton imports and can launch here (a CUDA driver, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install means "not available"
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: object, where: str = "backend") -> str:
    """``backend`` if it is one of `BACKENDS`; otherwise BackendError naming ``where`` and the value. The one check
    every layer, config and op uses, so an unknown backend is the same error everywhere (issue 11 item 5)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise BackendError(f"unknown {where} {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a requested backend name to the concrete one ("torch" or "triton")."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise BackendError(
            "backend='triton' needs a CUDA device or TRITON_INTERPRET=1 set before triton is imported; "
            f"tensors are on {tensors[0].device}"
        )
    return "triton"
