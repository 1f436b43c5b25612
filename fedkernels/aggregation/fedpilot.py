"""Fed-pilot STAgg/DWA (arXiv 2410.10200; no official code, our interpretation [I] in algorithms.md sec. 1(b)).

Per module i with trainers T_i: spatial part ``Delta_i = sum_{k in T_i} p_k (theta_k - theta_g) / sum_{k in T_i} p_k``
(rank rows averaged over the clients covering them); coverage ``rho_i = sum_{k in T_i} p_k`` with p normalised over
all accepted clients of the round; staleness ``u_i`` = rounds since module i was last updated. Update
``theta_g <- theta_g + eta_i Delta_i`` on A and B with ``eta_i = min(eta_max, (1/rho_i)^beta (1+u_i)^gamma)``.
``beta = gamma = 0`` is per-key FedAvg (Fed-HeLLo's rule). Staleness is kept in ``GlobalState.extra["staleness"]``.
"""

from __future__ import annotations

import math
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
    note_untrained,
    step_toward,
)
from fedkernels.errors import ConfigError

__all__ = ["FedPilot", "FedPilotOptions"]


@dataclass
class FedPilotOptions(RuleOptions):
    """``eta_max`` caps the compensation (2.0 [I]: at most doubles a module's step); ``beta`` boosts modules
    few clients trained; ``gamma`` boosts modules not updated for a while.

    Defaults ``beta = gamma = 0`` (per-key FedAvg over trainers): measured on the BBC demo setting (MiniLM-L6,
    10 clients Dirichlet 0.5, 5 per round, 8 local steps, lr 5e-3, seed 0), the coverage boost ``beta=0.5``
    made training unstable (held-out accuracy 0.60 after 4 rounds, 0.40 after 6) where ``beta=0`` reached
    0.91 and 0.81; at lr 1e-2 (4 rounds) 0.27 vs 0.76. The compensation stays available as an option.
    """

    eta_max: float = 2.0
    beta: float = 0.0
    gamma: float = 0.0
    # Not Fed-pilot's: the server step of fk-adaptive (fedkernels/aggregation/adaptive.py) on A, B and the head,
    # for the ablation "is our gain the server step alone?" (docs/suite-protocol-notes.md). 1 = the paper's rule.
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_server_lr("fedpilot", self.server_lr)
        for k in ("eta_max", "beta", "gamma"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"fedpilot option {k} must be a finite number, got {v!r}")
        if self.eta_max <= 0:
            raise ConfigError(f"fedpilot option eta_max must be positive, got {self.eta_max!r}")
        if self.beta < 0 or self.gamma < 0:
            raise ConfigError(f"fedpilot options beta, gamma must be >= 0, got beta={self.beta!r} gamma={self.gamma!r}")


class FedPilot(AggregationRule):
    name = "fedpilot"
    Options = FedPilotOptions

    @property
    def head_step(self) -> float:
        return float(self.options.server_lr)

    def eta(self, rho: float, staleness: int) -> float:
        o = self.options
        return min(o.eta_max, (1.0 / rho) ** o.beta * (1.0 + staleness) ** o.gamma)

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        total = sum(self.raw_weight(u) for u in updates)
        stale = dict(state.extra.get("staleness", {}))
        etas = {}
        for m in state.factors:
            u_m = int(stale.get(m, 0))
            ts = self.trainers(updates, m)
            if not ts:
                note_untrained(result, m)
                stale[m] = u_m + 1
                continue
            rho = sum(self.raw_weight(u) for u, _ in ts) / total
            eta = self.eta(rho, u_m)
            etas[m] = eta
            eta *= float(self.options.server_lr)  # after logging: the notes report the compensation
            gA, gB = state.factors[m]
            dt = compute_dtype(gA)
            contribs = [(*folded(u, m, state.scales[m], dt), p) for u, p in ts]
            avgA, avgB = average_by_rank(gA, gB, contribs, pad="rows")  # = theta_g + Delta on covered rows
            state.factors[m] = (step_toward(gA, avgA, eta, dt), step_toward(gB, avgB, eta, dt))
            stale[m] = 0
        state.extra["staleness"] = stale
        if etas:
            lo, hi = min(etas.values()), max(etas.values())
            result.notes.append(f"fedpilot: eta in [{lo:.3g}, {hi:.3g}] over {len(etas)} trained module(s)")
