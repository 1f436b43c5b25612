"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): zero-padding aggregation with sparsity weighting.

Server (algorithms.md sec. 5, [P]): zero-pad every trainer's A rows / B columns to the global rank R and sum with
``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F``: ``A = sum w_k pad(A_k)``, ``B = sum w_k pad(B_k)``.
``||B A||_F`` is computed from the factors: ``||B A||_F^2 = <B^T B, A A^T>`` (r x r Gram matrices, never out x in).
If every trainer's norm is zero (B = 0, nothing learnt) the weights fall back to sample counts (noted).

Rank self-pruning ([R], optional, ``prune_gamma`` in (0, 1)): the paper regularises the tail
``||B[:, g:r] A[g:r]||_F`` (g = floor(gamma r)) on the client and, if that tail norm shrank since the previous
round, sets ``r <- max(r_min, g)``. The client-side term is `HetLoRA.local_penalty` (``tail_penalty`` = lambda,
default 0: no term; the trainer adds it to each client's loss); the server keeps the tail norms and pruned ranks
in ``GlobalState.extra`` ([I]): a pruned client's rows beyond its pruned rank are dropped from its update and
zeroed in its next start, so it trains (and sends) only the kept ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    Factors,
    GlobalState,
    RuleOptions,
    average_by_rank,
    compute_dtype,
    folded,
)
from fedkernels.errors import ConfigError

__all__ = ["HetLoRA", "HetLoRAOptions", "product_norm", "product_norm_sq"]


def product_norm_sq(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``||B @ A||_F^2 = <B^T B, A A^T>`` from the r x r Gram matrices (never out x in); differentiable."""
    return ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum()


def product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B @ A||_F`` (clamped at 0 against rounding)."""
    return math.sqrt(max(float(product_norm_sq(B, A)), 0.0))


@dataclass
class HetLoRAOptions(RuleOptions):
    """``weighting``: "norm" (paper), "norm_samples" (norm times n_k) or "samples"/"uniform";
    ``prune_gamma``: None (no self-pruning) or the factor gamma in (0, 1); ``prune_min_rank``: lower bound r_min;
    ``tail_penalty``: lambda of the client-side term ``lambda * sum_modules ||B[:, g:r] A[g:r]||_F`` (needs
    ``prune_gamma``; 0 = no term). The paper leaves lambda to tuning ([R]); the norm is of the raw factors, without
    the LoRA scale, as written in the paper."""

    weighting: str = "norm"
    prune_gamma: float | None = None
    prune_min_rank: int = 1
    tail_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting not in ("norm", "norm_samples", "samples", "uniform"):
            raise ConfigError(
                f"hetlora weighting must be norm, norm_samples, samples or uniform, got {self.weighting!r}"
            )
        g = self.prune_gamma
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g < 1):
            raise ConfigError(f"hetlora prune_gamma must be None or in (0, 1), got {self.prune_gamma!r}")
        if isinstance(self.prune_min_rank, bool) or not isinstance(self.prune_min_rank, int) or self.prune_min_rank < 1:
            raise ConfigError(f"hetlora prune_min_rank must be an integer >= 1, got {self.prune_min_rank!r}")
        lam = self.tail_penalty
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam < math.inf:
            raise ConfigError(f"hetlora tail_penalty must be a finite number >= 0, got {lam!r}")
        if lam > 0 and g is None:
            raise ConfigError(f"hetlora tail_penalty={lam!r} needs prune_gamma (it defines the tail g = gamma r)")


class HetLoRA(AggregationRule):
    name = "hetlora"
    Options = HetLoRAOptions

    def _pruned(self, state: GlobalState, cid: int, m: str) -> int | None:
        return state.extra.get("pruned_ranks", {}).get(str(cid), {}).get(m)

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        o = self.options
        pruned = {c: dict(v) for c, v in state.extra.get("pruned_ranks", {}).items()}
        tails = {c: dict(v) for c, v in state.extra.get("tail_norms", {}).items()}
        for m, ts in self.trained_modules(state, updates, result):
            gA, gB = state.factors[m]
            dt = compute_dtype(gA)
            facs = []
            for u, p in ts:
                A, B = folded(u, m, state.scales[m], dt)
                keep = pruned.get(str(u.client_id), {}).get(m)
                if o.prune_gamma is not None:  # decide first: a client prunes before it sends (paper, [R])
                    r_eff = A.shape[0] if keep is None else min(keep, A.shape[0])
                    g = self.tail_start(r_eff)
                    tail = product_norm(B[:, g:r_eff], A[g:r_eff]) * state.scales[m]
                    prev = tails.get(str(u.client_id), {}).get(m)
                    if prev is not None and tail < prev and g < r_eff:
                        pruned.setdefault(str(u.client_id), {})[m] = keep = g
                        result.notes.append(f"hetlora: client {u.client_id} module {m!r} rank pruned {r_eff} -> {g} "
                                            f"(tail norm {tail:.3g} < {prev:.3g})")
                    tails.setdefault(str(u.client_id), {})[m] = tail
                if keep is not None and keep < A.shape[0]:  # drop the pruned ranks
                    A, B = A.clone(), B.clone()
                    A[keep:] = 0
                    B[:, keep:] = 0
                facs.append((A, B, p, product_norm(B, A) * state.scales[m]))
            if o.weighting in ("norm", "norm_samples"):
                raw = [nrm * (p if o.weighting == "norm_samples" else 1.0) for _, _, p, nrm in facs]
                tot = sum(raw)
                if tot > 0 and math.isfinite(tot):
                    ws = [x / tot for x in raw]
                else:
                    ws = [p for _, _, p, _ in facs]
                    result.notes.append(f"hetlora: module {m!r}: all update norms are zero; weights by samples")
            else:
                ws = [p for _, _, p, _ in facs]
            state.factors[m] = average_by_rank(gA, gB, [(A, B, w) for (A, B, _, _), w in zip(facs, ws, strict=True)],
                                               pad="zero")
        if o.prune_gamma is not None:
            state.extra["pruned_ranks"] = pruned
            state.extra["tail_norms"] = tails

    def tail_start(self, rank: int) -> int:
        """g = max(r_min, floor(gamma r)): the first tail rank of a module trained at ``rank``."""
        return max(self.options.prune_min_rank, math.floor(self.options.prune_gamma * rank))

    def local_penalty(self, client_id: int) -> Callable[[Factors], torch.Tensor] | None:
        """``lambda * sum_m ||B_m[:, g:r] A_m[g:r]||_F`` over the client's live factors (r = their active rank,
        already cut to a pruned rank by `start_for`), from r x r Gram matrices: differentiable, never out x in."""
        lam = float(self.options.tail_penalty)
        if lam == 0 or self.options.prune_gamma is None:
            return None

        def penalty(factors: Factors) -> torch.Tensor:
            total = None
            for A, B in factors.values():
                r = A.shape[0]
                g = self.tail_start(r)
                if g >= r:
                    continue
                sq = product_norm_sq(B[:, g:r], A[g:r])
                # clamp: d sqrt(x)/dx is infinite at 0 (a zero B in round 0); below tiny the term has no gradient
                term = torch.sqrt(sq.clamp_min(torch.finfo(sq.dtype).tiny))
                total = term if total is None else total + term
            if total is None:
                return torch.zeros(())
            return lam * total

        return penalty

    def start_for(
        self, global_state: GlobalState, client_id: int, plan: dict[str, int], scales: dict[str, float] | None = None
    ) -> Factors:
        """Global factors truncated to the plan (at the client's scale, see `AggregationRule.start_for`); ranks this
        client pruned are zeroed in A and B (both, so their gradients vanish too and they stay pruned)."""
        out = super().start_for(global_state, client_id, plan, scales)
        for m, (A, B) in out.items():
            keep = self._pruned(global_state, client_id, m)
            if keep is not None and keep < A.shape[0]:
                A[keep:] = 0
                B[:, keep:] = 0
        return out
