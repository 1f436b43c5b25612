"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976; code ATP-1010/FederatedLLM @ 7bea158): stacking.

Per module over its trainers (algorithms.md sec. 4): ``A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]``,
``B_stack = [B_1 | ... | B_K]``, so ``B_stack A_stack = sum p_k s_k B_k A_k`` exactly (each client's scale folded
into A, the stacked scale is 1; this covers unequal alpha/r and partial participation). The product goes into
the frozen base weight (`AggregationResult.base_deltas`, applied with `fedkernels.ops.merge_stacked`), and the
adapters restart: global A fresh Kaiming-uniform-like (U(-1/sqrt(in), 1/sqrt(in)), peft's init), B = 0. Each
client's start is its own fresh A (seeded by (seed, round, client, module), so runs are reproducible) and B = 0.
A module nobody trained keeps its base weight; if its adapter product is non-zero it is merged too, so that
re-initialising does not change the model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from fedkernels.aggregation.base import (
    AggregationResult,
    AggregationRule,
    ClientUpdate,
    Factors,
    GlobalState,
    RuleOptions,
    compute_dtype,
    note_untrained,
)
from fedkernels.errors import ConfigError
from fedkernels.ops.aggregation import stack_lora

__all__ = ["FLoRA", "FLoRAOptions", "fresh_A"]


def fresh_A(rank: int, d_in: int, *, seed: int, round_idx: int, client: int, module: str,
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """peft-like init of A ``[rank, d_in]``: U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming_uniform with a=sqrt(5)) from a
    generator seeded by (seed, round, client, module); client = -1 is the server's global adapter."""
    g = torch.Generator(device="cpu")
    key = f"{seed}/{round_idx}/{client}/{module}".encode()
    g.manual_seed(zlib.crc32(key) * 2654435761 % (2**63 - 1))
    bound = 1.0 / math.sqrt(d_in)
    A = (torch.rand(rank, d_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return A.to(dtype=dtype, device=device)


@dataclass
class FLoRAOptions(RuleOptions):
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"flora seed must be an integer, got {self.seed!r}")


class FLoRA(AggregationRule):
    name = "flora"
    Options = FLoRAOptions
    mutates_base = True  # the stacked product goes into the base weight every round (`base_deltas`)

    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans, result: AggregationResult) -> None:
        new_round = state.round + 1
        for m in state.factors:
            gA, gB = state.factors[m]
            dt = compute_dtype(gA)
            ts = self.trainers(updates, m)
            if ts:
                As = [u.factors[m][0].to(dt) for u, _ in ts]
                Bs = [u.factors[m][1].to(dt) for u, _ in ts]
                A_stack, B_stack = stack_lora(As, Bs, [p * float(u.scales[m]) for u, p in ts])
                result.base_deltas[m] = (A_stack, B_stack, 1.0)
            else:
                note_untrained(result, m)
                if bool(gB.ne(0).any()) and bool(gA.ne(0).any()):
                    result.base_deltas[m] = (gA.to(dt).clone(), gB.to(dt).clone(), state.scales[m])
                    result.notes.append(f"flora: module {m!r}: untrained, its non-zero adapter merged before reset")
            R, d_in = gA.shape
            A0 = fresh_A(R, d_in, seed=self.options.seed, round_idx=new_round, client=-1, module=m,
                         dtype=gA.dtype, device=gA.device)
            state.factors[m] = (A0, torch.zeros_like(gB))

    def start_for(self, global_state: GlobalState, client_id: int, plan: dict[str, int]) -> Factors:
        out: Factors = {}
        for m, r in plan.items():
            gA, gB = self.planned_factors(global_state, client_id, m, r)
            A = fresh_A(r, gA.shape[1], seed=self.options.seed, round_idx=global_state.round, client=int(client_id),
                        module=m, dtype=gA.dtype, device=gA.device)
            out[m] = (A, gB.new_zeros(gB.shape[0], r))
        return out
