"""FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT"): FedAvg of A and B separately.

``A = sum p_k A_k``, ``B = sum p_k B_k`` per module over its trainers (algorithms.md sec. 5). Inexact: the product
differs from ``sum p_k B_k A_k`` by the weighted covariance ``sum p_k (B_k - B)(A_k - A)``. Clients of smaller
rank cover only the first r_k rank rows; with ``pad="rows"`` (default) each row is averaged over the clients that
cover it, with ``pad="zero"`` clients are zero-padded to R (FLoRA's "zero-padding" baseline).

``server_lr`` (not FedIT's; 1 = the paper's rule): the server moves A, B and the head only that far towards the
clients' average, ``A' = A + server_lr (avg A - A)``. It exists for the ablation "is fk-adaptive's gain its server
step alone?" on the plans of ``fedit-min`` (docs/suite-protocol-notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    GlobalState,
    RuleOptions,
    average_by_rank,
    check_server_lr,
    compute_dtype,
    folded,
    step_toward,
)
from fedkernels.errors import ConfigError

__all__ = ["FedIT", "FedITOptions"]


@dataclass
class FedITOptions(RuleOptions):
    """``pad``: "rows" (average each rank row over the clients covering it) or "zero" (zero-pad to R);
    ``server_lr``: the server's step towards the average (module docstring; 1 = FedIT)."""

    pad: str = "rows"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_server_lr("fedit", self.server_lr)
        if self.pad not in ("rows", "zero"):
            raise ConfigError(f"pad must be 'rows' or 'zero', got {self.pad!r}")


class FedIT(AggregationRule):
    name = "fedit"
    Options = FedITOptions

    @property
    def head_step(self) -> float:
        return float(self.options.server_lr)

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        for m, ts in self.trained_modules(state, updates, result):
            gA, gB = state.factors[m]
            dt = compute_dtype(gA)
            contribs = [(*folded(u, m, state.scales[m], dt), p) for u, p in ts]
            avgA, avgB = average_by_rank(gA, gB, contribs, pad=self.options.pad)
            step = float(self.options.server_lr)
            if step != 1.0:  # exactly the paper's rule at 1 (no rounding through the interpolation)
                avgA, avgB = step_toward(gA, avgA, step, dt), step_toward(gB, avgB, step, dt)
            state.factors[m] = (avgA, avgB)
