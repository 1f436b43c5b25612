"""In-process federated simulation: config, data partitioning, planning, local training, rounds.

The trainer (torch, transformers) is imported on first use of its names: ``from fedkernels.federated import
FederatedConfig`` must stay torch-free, so a bad config file is reported in well under a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedkernels.federated.config import PRESETS, STRATEGIES, FederatedConfig

if TYPE_CHECKING:
    from fedkernels.federated.trainer import FederatedTrainer, RunSummary

_LAZY = {"FederatedTrainer": "fedkernels.federated.trainer", "RunSummary": "fedkernels.federated.trainer"}

__all__ = ["PRESETS", "STRATEGIES", "FederatedConfig", "FederatedTrainer", "RunSummary"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedkernels.federated' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
