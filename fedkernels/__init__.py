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
from fedkernels.nn import LoRALinear
from fedkernels.ops import lora_linear

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "BackendError",
    "ClientUpdateError",
    "ConfigError",
    "FedKernelsError",
    "LoRALinear",
    "NonFiniteError",
    "RankError",
    "ShapeError",
    "UnknownModuleError",
    "lora_linear",
]
