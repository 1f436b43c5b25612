"""Random allocation instances and a brute-force oracle (all subsets x rank options, non-additive lmin term)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st

from solvers import AllocationProblem, Item


@st.composite
def problems(draw, max_options: int = 12, max_items: int = 8) -> AllocationProblem:
    """Problems with <= ``max_options`` (item, rank) options in total, random costs/values/blocks/budget."""
    num_blocks = draw(st.integers(1, 5))
    n_items = draw(st.integers(1, max_items))
    items = []
    used = 0
    for i in range(n_items):
        room = max_options - used
        if room <= 0:
            break
        k = draw(st.integers(1, min(2, room)))
        used += k
        ranks = tuple(sorted(draw(st.lists(st.sampled_from([4, 8, 16, 32]), min_size=k, max_size=k, unique=True))))
        costs = tuple(draw(st.lists(st.integers(0, 400), min_size=k, max_size=k)))
        # Values on a 1/8 grid keep sums exact in binary floating point, so "equal" means equal.
        values = tuple(v / 8 for v in draw(st.lists(st.integers(0, 80), min_size=k, max_size=k)))
        items.append(Item(f"m{i}", draw(st.integers(0, num_blocks - 1)), ranks, costs, values))
    block_costs = tuple(draw(st.lists(st.integers(0, 600), min_size=num_blocks, max_size=num_blocks)))
    static = draw(st.integers(0, 100))
    head = draw(st.integers(0, 50))
    probe = AllocationProblem(tuple(items), block_costs, static, head, 0)
    budget = draw(st.integers(0, probe.max_train_bytes() + 50))
    return probe.with_budget(budget)


def brute_force(problem: AllocationProblem) -> tuple[float, dict[str, int]]:
    """Exact optimum by enumerating every level (0 = untrained, o+1 = option o) of every module."""
    n = len(problem.items)
    k = max(len(it.ranks) for it in problem.items)
    cost = np.zeros((n, k + 1), dtype=np.int64)
    value = np.zeros((n, k + 1))
    for i, it in enumerate(problem.items):
        cost[i, 1 : len(it.ranks) + 1] = it.costs
        value[i, 1 : len(it.ranks) + 1] = it.values
    levels = np.array(list(itertools.product(*[range(len(it.ranks) + 1) for it in problem.items])), dtype=np.int64)
    rows = np.arange(n)[None, :]
    add = cost[rows, levels].sum(axis=1)
    val = value[rows, levels].sum(axis=1)
    blocks = np.array([it.block for it in problem.items])
    lmin = np.where(levels > 0, blocks[None, :], problem.num_blocks).min(axis=1)
    suffix = np.array([problem.activation_bytes(j) for j in range(problem.num_blocks)] + [0])
    total = problem.fixed_bytes + add + suffix[lmin]
    val = np.where(total <= problem.budget, val, -np.inf)
    best = int(np.argmax(val))
    plan = {it.name: it.ranks[lv - 1] for it, lv in zip(problem.items, levels[best], strict=True) if lv}
    return float(val[best]), plan


def llama_like(num_blocks: int = 32, seed: int = 0) -> AllocationProblem:
    """A 32 x 7-module Llama-7B-shaped problem with random importance values (budget set by the caller)."""
    rng = np.random.default_rng(seed)
    d, ffn, tokens, e = 4096, 11008, 4 * 512, 2
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}
    items = []
    for b in range(num_blocks):
        for name, (din, dout) in shapes.items():
            costs = tuple(r * (din + dout) * 12 + tokens * r * e + tokens * din * e for r in (8, 16))
            v8 = float(rng.uniform(0.1, 1.0))
            items.append(Item(f"layers.{b}.{name}", b, (8, 16), costs, (v8, v8 * float(rng.uniform(1.05, 1.6)))))
    block_costs = tuple(
        int(tokens * (10 * d + 3 * ffn) * e * float(rng.uniform(0.95, 1.05))) for _ in range(num_blocks)
    )
    return AllocationProblem(tuple(items), block_costs, 14 * 2**30, 2 * 2**30, 20 * 2**30)
