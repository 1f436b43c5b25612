"""fedkernels: federated LoRA fine-tuning for clients with heterogeneous memory budgets."""

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
from fedkernels.nn import LoRAConfig, LoRALinear, export_peft, from_peft, inject_lora, load_adapter, lora_modules
from fedkernels.ops import lora_linear

__version__ = "0.1.0"

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
