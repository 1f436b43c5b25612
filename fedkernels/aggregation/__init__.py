"""Aggregation rules of federated LoRA behind a small registry: ``get(name, **options)``.

Rules (one file each; formulas and sources in shared/docs/algorithms.md): ``fedit`` (FedAvg of A and B, inexact
baseline), ``ffa`` (A frozen, B averaged), ``flora`` (stacking, merged into the base, adapters re-initialised),
``hetlora`` (zero-padding with norm weighting, optional rank self-pruning), ``flexlora`` (SVD of the full-size
weighted product, best rank-r_i approximation per client), ``fedra`` / ``fedhello`` (per-module average over the
clients that trained it), ``fedpilot`` (per-module average with coverage/staleness compensation); ``fk-adaptive``
(ours: exact average of the product updates across ranks, bounded compensation, SVD back to the global rank).
"""

from __future__ import annotations

from typing import Any

from fedkernels.aggregation.adaptive import FKAdaptive
from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    GlobalState,
    validate_update,
)
from fedkernels.aggregation.fedhello import FedHeLLo
from fedkernels.aggregation.fedit import FedIT
from fedkernels.aggregation.fedpilot import FedPilot
from fedkernels.aggregation.fedra import FedRA
from fedkernels.aggregation.ffa import FFA
from fedkernels.aggregation.flexlora import FlexLoRA
from fedkernels.aggregation.flora import FLoRA
from fedkernels.aggregation.hetlora import HetLoRA
from fedkernels.errors import ConfigError

__all__ = [
    "AggregationResult",
    "AggregationRule",
    "ClientUpdate",
    "GlobalState",
    "available",
    "get",
    "validate_update",
]

_RULES: dict[str, type[AggregationRule]] = {
    cls.name: cls for cls in (FedIT, FFA, FLoRA, HetLoRA, FlexLoRA, FedRA, FedHeLLo, FedPilot, FKAdaptive)
}


def available() -> list[str]:
    """Names accepted by `get`, sorted."""
    return sorted(_RULES)


def get(name: str, **options: Any) -> AggregationRule:
    """A new rule instance; unknown names or options raise ConfigError (a ValueError) quoting them."""
    if name not in _RULES:
        raise ConfigError(f"unknown aggregation rule {name!r}; available: {', '.join(available())}")
    return _RULES[name](**options)
