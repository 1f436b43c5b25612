"""Plain data of the memory model: module specs, optimizer-state counts, dtype sizes, module-name parsing.

A leaf module (imports nothing from `solvers` but its errors, and no torch), shared by the model
(`solvers.memory_model`), the analytic presets (`solvers._analytic`) and the measurement
(`solvers.measure`), so none of them imports another at load time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from solvers.errors import ProblemError

__all__ = ["ModuleSpec", "OPT_STATES", "opt_states", "opt_scalar_bytes", "dtype_name", "dtype_bytes", "kind_of",
           "infer_blocks", "PEFT_PREFIX"]

# Optimizer state bytes per trainable parameter, in units of the parameter's own element size.
# AdamW keeps exp_avg and exp_avg_sq (torch.optim.AdamW, same dtype as the parameter); plain SGD none.
OPT_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
# Scalar state bytes per parameter tensor: torch.optim.Adam/AdamW keep a float32 ``step`` tensor per parameter
# (4 bytes; measured: 24 bytes more peak per block of 3 LoRA modules, 6 factors, on a tiny Llama).
OPT_SCALAR_BYTES = {"adamw": 4, "adam": 4, "sgd": 0, "sgd-momentum": 0}

# dtype spelling -> (canonical torch name, bytes per element)
_DTYPES = {"float32": ("float32", 4), "fp32": ("float32", 4), "float16": ("float16", 2), "fp16": ("float16", 2),
           "half": ("float16", 2), "bfloat16": ("bfloat16", 2), "bf16": ("bfloat16", 2)}

PEFT_PREFIX = "base_model.model."
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def opt_states(optimizer: str) -> int:
    """Optimizer states per trainable parameter (AdamW: 2); ProblemError naming an unknown optimizer."""
    try:
        return OPT_STATES[str(optimizer).lower()]
    except KeyError:
        raise ProblemError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPT_STATES)}") from None


def opt_scalar_bytes(optimizer: str) -> int:
    """Bytes of the optimizer's per-tensor scalar state (Adam's ``step``); see `OPT_SCALAR_BYTES`."""
    opt_states(optimizer)
    return OPT_SCALAR_BYTES[str(optimizer).lower()]


def _entry(name: object) -> tuple[str, int]:
    key = str(name).lower().removeprefix("torch.")
    try:
        return _DTYPES[key]
    except KeyError:
        raise ProblemError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def dtype_name(name: object) -> str:
    """Canonical name (``float32``, ``float16``, ``bfloat16``) of a dtype spelling or a ``torch.dtype``."""
    return _entry(name)[0]


def dtype_bytes(name: object) -> int:
    """Bytes per element of a dtype spelling or a ``torch.dtype``."""
    return _entry(name)[1]


def kind_of(name: str) -> str:
    """Module name with its block index (and peft's wrapper prefix) removed: the same kind in every block."""
    name = name.removeprefix(PEFT_PREFIX)
    return _INDEX.sub(lambda m: m.group(0).replace(m.group(1), "#"), name, count=1)


def infer_blocks(names: Iterable[str]) -> dict[str, int]:
    """Block index of each module name: the first integer path component (``...layer.3.attention...``)."""
    out = {}
    for n in names:
        m = _INDEX.search(n)
        if m is None:
            raise ProblemError(f"cannot infer a block index from module name {n!r}; pass blocks=")
        out[n] = int(m.group(1))
    return out


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-adapted module: name, block (0 = closest to the input), shapes and allocated rank.

    ``kind``: the name without its block index; ``group``: modules of one block sharing a group read the
    same input (its saved copy is counted once); ``order``: forward order inside the block.
    """

    name: str
    block: int
    d_in: int
    d_out: int
    max_rank: int
    kind: str = ""
    group: str = ""
    order: int = 0
