"""Random global states and client updates for the aggregation tests (float64, never zeros)."""

from __future__ import annotations

import torch

from fedkernels.aggregation import ClientUpdate, GlobalState

D = torch.float64
# two modules of equal shape (batched together by flexlora) and one of another shape
SHAPES = {"l0.q": (12, 10), "l0.v": (12, 10), "l1.q": (9, 14)}  # module -> (out, in)
R = 6
SCALE = 2.0


def global_state(dtype=D, zero_B: bool = False) -> GlobalState:
    factors = {}
    for m, (o, i) in SHAPES.items():
        B = torch.zeros(o, R, dtype=dtype) if zero_B else torch.randn(o, R, dtype=dtype)
        factors[m] = (torch.randn(R, i, dtype=dtype), B)
    return GlobalState.from_factors(factors, {m: SCALE for m in SHAPES})


def update(cid: int, plan: dict[str, int], n: int, *, scale: float = SCALE, zero_B: bool = False,
           dtype=D) -> ClientUpdate:
    factors = {}
    for m, r in plan.items():
        o, i = SHAPES[m]
        B = torch.zeros(o, r, dtype=dtype) if zero_B else torch.randn(o, r, dtype=dtype)
        factors[m] = (torch.randn(r, i, dtype=dtype), B)
    return ClientUpdate(client_id=cid, factors=factors, ranks=dict(plan), scales={m: scale for m in plan},
                        num_samples=n)


def round_setup(num: int = 4):
    """Heterogeneous plans: client 0 everything at R, others subsets at smaller ranks."""
    plans = {
        0: {m: R for m in SHAPES},
        1: {"l0.q": 3, "l1.q": 2},
        2: {"l0.q": 4, "l0.v": 4, "l1.q": 4},
        3: {"l0.v": 5},
        4: {"l0.q": 2, "l0.v": 6},
    }
    plans = {c: plans[c] for c in range(num)}
    ns = {0: 50, 1: 20, 2: 35, 3: 12, 4: 41}
    updates = [update(c, plans[c], ns[c]) for c in plans]
    return plans, updates
