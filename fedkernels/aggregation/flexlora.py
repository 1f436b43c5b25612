"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505; FederatedScope `FlexLoRA` branch @ 4643e1a,
`fed_utils/model_aggregation.py::FlexLoRA`, `adaptive_peft.py::distribute_weight_fast`).

Per module over its trainers (algorithms.md sec. 3): ``W_g = sum p_k s_k B_k A_k`` (each client's own scale
alpha/r_k), SVD, and every party gets the best rank-r approximation of W_g (Eckart-Young), re-split with its own
scale: ``s_k B_k' A_k' = best_rank_{r_k}(W_g)``. The global state is the best rank-R approximation (global scale);
a trainer whose scale differs from the global one gets its own rank-r_k split in `AggregationResult.client_starts`
(with equal scales that split is exactly the global factors truncated to r_k, the default `start_for`).
W_g is never formed: stacking + `fedkernels.ops.factor_svd` (QR of the factors, S x S core SVD), batched over
every group of modules with equal shapes, trainers, ranks and scales (a 7B adapter set has 224 modules but only a
few such groups).

Option ``factor_split`` (`flexlora_redistribute`): ``"balanced"`` (default: ``sqrt(sigma)`` on each factor) or
``"orthonormal-a"`` (the FlexLoRA code's: all of sigma on B). The products, and so every aggregated model, are the
same; the factors differ, which changes how the next round's local steps move them. For ours the two splits
measured the same on both tasks' tuning seeds (docs/suite-protocol-notes.md, session 6); the suite's FlexLoRA runs
used the balanced split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    GlobalState,
    RuleOptions,
    check_factor_split,
    compute_dtype,
)
from fedkernels.ops.factor_ops import flexlora_redistribute

__all__ = ["FlexLoRA", "FlexLoRAOptions"]


@dataclass
class FlexLoRAOptions(RuleOptions):
    """``factor_split``: how the re-factorisation puts the singular values on the factors (module docstring)."""

    factor_split: str = "balanced"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_factor_split("flexlora", self.factor_split)


class FlexLoRA(AggregationRule):
    name = "flexlora"
    Options = FlexLoRAOptions

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        groups: dict[tuple, list[tuple[str, list[tuple[ClientUpdate, float]]]]] = {}
        for m, ts in self.trained_modules(state, updates, result):
            gA, gB = state.factors[m]
            key = (tuple(gA.shape), tuple(gB.shape), gA.dtype, gA.device, float(state.scales[m]),
                   tuple((u.client_id, u.factors[m][0].shape[0], float(u.scales[m]), p) for u, p in ts))
            groups.setdefault(key, []).append((m, ts))
        for key, members in groups.items():
            (R, _), _, gdtype, _, s_g, _ = key
            ts0 = members[0][1]
            dt = compute_dtype(state.factors[members[0][0]][0])
            As = [torch.stack([dict((u.client_id, u) for u, _ in ts)[c.client_id].factors[m][0].to(dt)
                               for m, ts in members]) for c, _ in ts0]
            Bs = [torch.stack([dict((u.client_id, u) for u, _ in ts)[c.client_id].factors[m][1].to(dt)
                               for m, ts in members]) for c, _ in ts0]
            m0 = members[0][0]
            weights = [p * float(u.scales[m0]) for u, p in ts0]
            # Same scale as the global: the client's best rank-r_k split is exactly the global factors truncated
            # to r_k (same SVD, same split), i.e. what `start_for` gives from the latest global state, so it
            # is neither computed nor emitted (a stored one would go stale while the client is not sampled).
            own = [(u, A.shape[-2]) for (u, _), A in zip(ts0, As, strict=True) if float(u.scales[m0]) != s_g]
            ranks = [R] + [r for _, r in own]
            scales = [s_g] + [float(u.scales[m0]) for u, _ in own]
            outs = flexlora_redistribute(As, Bs, weights, ranks, scales=scales, compute_dtype=dt,
                                         split=self.options.factor_split)
            gA_new, gB_new = outs[0]
            for j, (m, _) in enumerate(members):
                state.factors[m] = (gA_new[j].to(gdtype), gB_new[j].to(gdtype))
            for (u, _), (A_k, B_k) in zip(own, outs[1:], strict=True):
                starts = result.client_starts.setdefault(int(u.client_id), {})
                for j, (m, _) in enumerate(members):
                    starts[m] = (A_k[j].to(u.factors[m][0].dtype), B_k[j].to(u.factors[m][1].dtype))
