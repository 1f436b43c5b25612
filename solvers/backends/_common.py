"""Helpers shared by the backends: grouping problems that share a model, item arrays, best single module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from solvers.problem import AllocationProblem


@dataclass
class ItemArrays:
    """Items of a problem as padded arrays (order = ``problem.items``).

    costs/values are ``(n_items, n_opts)``; missing options (items with fewer ranks) have ``valid == False``.
    """

    costs: np.ndarray  # int64
    values: np.ndarray  # float64
    valid: np.ndarray  # bool
    blocks: np.ndarray  # int64, block of each item
    suffix: np.ndarray  # int64, A(l) = sum_{j >= l} a_j, length num_blocks + 1


def item_arrays(problem: AllocationProblem) -> ItemArrays:
    n = len(problem.items)
    k = max((len(it.ranks) for it in problem.items), default=1)
    costs = np.zeros((n, k), dtype=np.int64)
    values = np.zeros((n, k), dtype=np.float64)
    valid = np.zeros((n, k), dtype=bool)
    for i, it in enumerate(problem.items):
        m = len(it.ranks)
        costs[i, :m] = it.costs
        values[i, :m] = it.values
        valid[i, :m] = True
    blocks = np.array([it.block for it in problem.items], dtype=np.int64)
    suffix = np.array([problem.activation_bytes(j) for j in range(problem.num_blocks)] + [0], dtype=np.int64)
    return ItemArrays(costs, values, valid, blocks, suffix)


def group_problems(problems: Sequence[AllocationProblem], extra=None) -> list[tuple[tuple, list[int]]]:
    """``(key, indices)`` of problems sharing items and block costs (and ``extra(problem)``), in input order."""
    keys: list[tuple] = []
    members: list[list[int]] = []
    by_id: dict[tuple, int] = {}
    for k, p in enumerate(problems):
        # Clients built from one model share the very same tuple objects (`with_budget` keeps them): key on
        # identity so a 224-item tuple is compared once per distinct object, never hashed per client.
        ident = (id(p.items), id(p.block_costs), p.quantum)
        g = by_id.get(ident)
        if g is None:
            key = (p.items, p.block_costs) if extra is None else (p.items, p.block_costs, extra(p))
            g = next((j for j, existing in enumerate(keys) if existing == key), None)
            if g is None:
                keys.append(key)
                members.append([])
                g = len(keys) - 1
            by_id[ident] = g
        members[g].append(k)
    return list(zip(keys, members, strict=True))


def best_single(arrs: ItemArrays, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best plan with exactly one module per client, under exact costs.

    ``capacity`` = budget - static - head per client. Returns (value, item, option) per client; value -1 when
    no single module fits.
    """
    total = arrs.costs + arrs.suffix[arrs.blocks][:, None]  # (n, k) exact extra bytes of the single-module plan
    flat_cost = np.where(arrs.valid, total, np.iinfo(np.int64).max).ravel()
    flat_val = arrs.values.ravel()
    fits = flat_cost[None, :] <= capacity[:, None]
    score = np.where(fits, flat_val[None, :], -1.0)
    best = np.argmax(score, axis=1)
    val = score[np.arange(len(capacity)), best]
    k = arrs.costs.shape[1]
    return val, best // k, best % k
