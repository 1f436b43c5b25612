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


def group_problems(problems: Sequence[AllocationProblem], extra=None) -> dict[tuple, list[int]]:
    """Indices of problems sharing items and block costs (and ``extra(problem)``), in input order."""
    groups: dict[tuple, list[int]] = {}
    cache: dict[int, tuple] = {}
    for k, p in enumerate(problems):
        # Clients built from one model usually share the very same tuple objects: key on identity first so
        # hashing 224 items happens once, then fall back to value equality through the dict.
        ident = (id(p.items), id(p.block_costs))
        base = cache.get(ident)
        if base is None:
            base = (p.items, p.block_costs)
            cache[ident] = base
        key = base if extra is None else (*base, extra(p))
        groups.setdefault(key, []).append(k)
    return groups


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
