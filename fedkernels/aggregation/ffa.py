"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared initialisation, only B is trained and averaged;
``sum p_k B_k A = (sum p_k B_k) A`` makes FedAvg exact (algorithms.md sec. 5). The clients' A are ignored (they
equal the global A when clients respect the freeze); B columns are averaged over the clients whose rank covers
them."""

from __future__ import annotations

from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    GlobalState,
    average_by_rank,
    compute_dtype,
)

__all__ = ["FFA"]


class FFA(AggregationRule):
    name = "ffa"
    frozen_A = True

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        for m, ts in self.trained_modules(state, updates, result):
            gA, gB = state.factors[m]
            dt = compute_dtype(gA)
            contribs = []
            for u, p in ts:
                _, B = u.factors[m]
                # A is the shared frozen one, so the scale ratio goes on B alone: s_g B' A = s_k B A.
                contribs.append((gA[: B.shape[1]], B.to(dt) * (float(u.scales[m]) / state.scales[m]), p))
            _, newB = average_by_rank(gA, gB, contribs, pad="rows")
            state.factors[m] = (gA, newB)
