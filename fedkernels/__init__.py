"""fedkernels: federated LoRA fine-tuning for clients with heterogeneous memory budgets.

The layers and ops below are imported on first use (module ``__getattr__``, PEP 562): importing torch takes
1-10 s on a small machine, and ``import fedkernels.cli`` (``fedkernels --help``, ``fedkernels plan``) or
``fedkernels.errors`` must not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedkernels.errors import (
    AdapterFormatError,
    BackendError,
    ClientUpdateError,
    ConfigError,
    FedKernelsError,
    NonFiniteError,
    RankError,
    ShapeError,
    UnknownModuleError,
)

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from fedkernels.nn import (
        LoRAConfig,
        LoRALinear,
        export_peft,
        from_peft,
        inject_lora,
        load_adapter,
        lora_modules,
    )
    from fedkernels.ops import lora_linear

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first attribute access)
_LAZY = {
    "LoRAConfig": "fedkernels.nn",
    "LoRALinear": "fedkernels.nn",
    "export_peft": "fedkernels.nn",
    "from_peft": "fedkernels.nn",
    "inject_lora": "fedkernels.nn",
    "load_adapter": "fedkernels.nn",
    "lora_modules": "fedkernels.nn",
    "lora_linear": "fedkernels.ops",
}

__all__ = [
    "AdapterFormatError",
    "BackendError",
    "ClientUpdateError",
    "ConfigError",
    "FedKernelsError",
    "LoRAConfig",
    "LoRALinear",
    "export_peft",
    "from_peft",
    "inject_lora",
    "load_adapter",
    "lora_modules",
    "NonFiniteError",
    "RankError",
    "ShapeError",
    "UnknownModuleError",
    "lora_linear",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
