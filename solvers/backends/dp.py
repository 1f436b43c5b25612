"""Exact backend: enumerate the lowest trainable block, multiple-choice knapsack DP over discretised memory.

Formulation from ../shared/docs/algorithms.md sec. 1b ("Exact solver without an ILP library"). Two
refinements over the per-block enumeration written there:

* One DP pass serves every lowest block. Items are added in order of *decreasing* block, and the table is
  snapshotted after the last item of each block ``l``: snapshot ``l`` holds the best value over modules in blocks
  ``>= l`` for every capacity. A plan read from snapshot ``l`` at capacity ``budget - M_static - M_head - A(l)``
  has true lowest block ``>= l``, hence true activation cost ``<= A(l)``: it fits. The optimum's own lowest block
  ``l*`` is one of the snapshots, so the best over snapshots is optimal (up to the grid). Cost
  ``O(|items| * options * cells)`` instead of ``O(L * ...)``.
* The table does not depend on the budget, so every client of one model shares it (`solve_many`): 1,000 clients
  cost one table plus O(L) look-ups and one back-track each.

Costs are rounded *up* to the grid ``quantum`` and capacities *down*, so every returned plan fits its exact budget.
Optimality certificate: a second table with costs rounded *down* is a relaxation (any exactly-feasible plan
satisfies sum floor(c/q) <= floor(cap/q)); its optimum bounds the true optimum from above. The relaxation's own
optimal plan is back-tracked too: when it fits under the exact costs it *is* optimal and is returned. When the
returned plan reaches the bound it is ``optimal``, else ``feasible`` (the message gives the gap).
When every cost is a multiple of the quantum (the automatic quantum picks the costs' gcd when that grid is small
enough) no rounding happens and the DP is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from solvers.backends._common import best_single, group_problems, item_arrays
from solvers.errors import SolverError
from solvers.problem import AllocationProblem, Plan, PlanStatus

#: csrc/knapsack.cpp's ABI_VERSION this module calls; a stale build (older signature) is ignored, not crashed on.
NATIVE_ABI = 2

try:  # built from csrc/knapsack.cpp by setup.py; optional
    from solvers import _knapsack  # type: ignore[attr-defined]

    if getattr(_knapsack, "ABI_VERSION", None) != NATIVE_ABI:  # pragma: no cover - depends on the build
        _knapsack = None
except ImportError:  # pragma: no cover - depends on the build
    _knapsack = None

#: Grid size of the coarse automatic quantum. 2**16 cells: for a Llama-7B-like problem (224 modules of ~18-48 MB,
#: sum ~5 GB) the quantum would be ~80 KB, <0.5% of one module; table cost 224 x 65536 one-byte choices (15 MB).
DEFAULT_CELLS = 1 << 16
#: An exact grid (quantum = gcd of all costs) is used when it needs at most this many cells and its choice table
#: (items x cells bytes) stays under EXACT_MAX_TABLE_BYTES. Costs from a memory model are usually multiples of a
#: few KiB (Llama-7B, batch 4 x 512, bf16: gcd 8 KiB, 630 k cells, 141 MB, ~0.5 s native).
EXACT_MAX_CELLS = 1 << 20
EXACT_MAX_TABLE_BYTES = 192 * 2**20


def auto_quantum(problem: AllocationProblem, cells: int = DEFAULT_CELLS) -> int:
    """Grid step in bytes when ``problem.quantum`` is None.

    The gcd of every option's cost when that grid is small enough (then rounding is a no-op and the DP is exact),
    else the sum of every module's largest cost over ``cells``. Either way it depends only on the items, not the
    budget, so clients of one model share one table.
    """
    total = sum(max(it.costs) for it in problem.items)
    g = 0
    for it in problem.items:
        for c in it.costs:
            g = math.gcd(g, c)
    if g > 0:
        exact_cells = total // g + 1
        if exact_cells <= EXACT_MAX_CELLS and exact_cells * len(problem.items) <= EXACT_MAX_TABLE_BYTES:
            return g
    return max(1, math.ceil(total / cells))


#: Conservative DP throughput (cell x option updates per second) on a busy 2-core x86 box: measured ~2.8e8
#: native and ~1.1e8 numpy on the Llama-7B bench (282 M updates), halved-and-more for safety.
_RATE = {"native": 1e8, "numpy": 4e7}


def resolved_quantum(problem: AllocationProblem, time_limit: float | None = None, impl: str = "native") -> int:
    """The problem's quantum, or the automatic one coarsened so the DP's estimated time fits ``time_limit``.

    An explicit ``problem.quantum`` is always kept. Under a time limit the automatic grid is coarsened (never
    below `DEFAULT_CELLS` cells) so that two tables (rounded up, rounded down) take at most half the limit by the
    conservative `_RATE` estimate; the plan's status then says whether the rounding cost optimality.
    """
    if problem.quantum is not None:
        return problem.quantum
    q = auto_quantum(problem)
    if time_limit is None or not problem.items:
        return q
    total = sum(max(it.costs) for it in problem.items)
    opts = sum(len(it.ranks) for it in problem.items)
    affordable = time_limit / 2 * _RATE.get(impl, _RATE["numpy"]) / (2 * opts)  # cells we can afford
    cells = max(float(DEFAULT_CELLS), affordable)
    if total / q > cells:
        q = max(q, math.ceil(total / cells))
    return q


def is_available(impl: str = "auto") -> bool:
    return impl != "native" or _knapsack is not None


def unavailable_reason(impl: str = "auto") -> str:
    return (
        f"native extension solvers._knapsack (ABI {NATIVE_ABI}) is not built or is stale "
        "(run `python setup.py build_ext --inplace`)"
    )


def _tables_numpy(w: np.ndarray, v: np.ndarray, cells: int, snap_at: np.ndarray, query: np.ndarray, want_choice):
    """Reference implementation of csrc/knapsack.cpp `mck` (same tie-breaking: first strictly better option)."""
    n, k = w.shape
    out = np.empty(query.shape, dtype=np.float64)
    choice = np.zeros((n, cells), dtype=np.int8) if want_choice else None
    f = np.zeros(cells, dtype=np.float64)
    s = 0
    while s < len(snap_at) and snap_at[s] == 0:
        out[s] = f[query[s]]
        s += 1
    for i in range(n):
        best = f.copy()
        pick = np.zeros(cells, dtype=np.int8) if want_choice else None
        for o in range(k):
            wo = int(w[i, o])
            if wo >= cells:
                continue
            cand = f[: cells - wo] + v[i, o]
            better = cand > best[wo:]
            best[wo:][better] = cand[better]
            if pick is not None:
                pick[wo:][better] = o + 1
        f = best
        if choice is not None:
            choice[i] = pick
        while s < len(snap_at) and snap_at[s] == i + 1:
            out[s] = f[query[s]]
            s += 1
    return out, choice


def _tables_native(w: np.ndarray, v: np.ndarray, cells: int, snap_at: np.ndarray, query: np.ndarray, want_choice):
    n, k = w.shape
    query = np.ascontiguousarray(query, dtype=np.int64)
    out = np.empty(query.shape, dtype=np.float64)
    choice = np.empty((n, cells), dtype=np.int8) if want_choice else None
    _knapsack.mck(
        np.ascontiguousarray(w, dtype=np.int64),
        np.ascontiguousarray(v, dtype=np.float64),
        n,
        k,
        cells,
        np.ascontiguousarray(snap_at, dtype=np.int64),
        query,
        out,
        choice,
    )
    return out, choice


def dp_tables(w, v, cells, snap_at, query, want_choice=True, impl="auto"):
    """Multiple-choice knapsack DP (see csrc/knapsack.cpp); ``impl`` in {"auto", "native", "numpy"}.

    Returns ``out[s, j]`` = best value over the first ``snap_at[s]`` items with rounded weight <= ``query[s, j]``,
    and the ``(n_items, cells)`` int8 choice table (0 = not taken, o+1 = option o) when ``want_choice``.
    """
    query = np.asarray(query, dtype=np.int64).reshape(len(snap_at), -1)
    if impl == "numpy" or (impl == "auto" and _knapsack is None):
        return _tables_numpy(w, v, cells, snap_at, query, want_choice)
    if _knapsack is None:
        raise SolverError("dp-native", unavailable_reason())
    return _tables_native(w, v, cells, snap_at, query, want_choice)


def _solve_group(problems: Sequence[AllocationProblem], q: int, impl: str, name: str) -> list[Plan]:
    t0 = time.perf_counter()
    ref = problems[0]
    arrs = item_arrays(ref)
    n, k = arrs.costs.shape
    order = np.argsort(-arrs.blocks, kind="stable")  # decreasing block
    blocks_sorted = arrs.blocks[order]
    cand_blocks = np.unique(arrs.blocks)[::-1]  # distinct blocks with modules, decreasing
    # snapshot after the last item of block >= l: number of items with block >= l
    snap_at = np.array([int(np.sum(blocks_sorted >= b)) for b in cand_blocks], dtype=np.int64)

    up = -(-arrs.costs // q)
    # The heaviest rounded-up plan (every module at its heaviest option) must fit in the table, so a capacity
    # clipped to the last cell loses nothing.
    cells = int(np.sum(np.max(np.where(arrs.valid, up, 0), axis=1))) + 1
    big = cells  # weight that disables a padding option
    w_up = np.where(arrs.valid, up, big)[order]
    v_sorted = np.where(arrs.valid, arrs.values, 0.0)[order]
    m = len(problems)
    rows = np.arange(m)
    free = np.array([p.budget - p.fixed_bytes for p in problems], dtype=np.int64)  # (m,)
    caps = free[:, None] - arrs.suffix[cand_blocks][None, :]  # (m, S) exact capacity for the additive part
    ok = caps >= 0
    idx = np.clip(np.where(ok, caps // q, 0), 0, cells - 1)
    table, choice = dp_tables(w_up, v_sorted, cells, snap_at, idx.T, True, impl)
    exact_grid = bool(np.all(arrs.costs[arrs.valid] % q == 0))
    if not exact_grid:
        w_down = np.where(arrs.valid, arrs.costs // q, big)[order]
        bound_table, bound_choice = dp_tables(w_down, v_sorted, cells, snap_at, idx.T, True, impl)
    else:
        w_down, bound_table, bound_choice = w_up, table, choice
    vals = np.where(ok, table.T, -np.inf)
    bounds = np.where(ok, bound_table.T, -np.inf)
    best_s = np.argmax(vals, axis=1)  # first max = highest lowest-block among ties = least activation memory
    bound_s = np.argmax(bounds, axis=1)
    upper = bounds[rows, bound_s]

    c_sorted = np.concatenate([np.zeros((n, 1), np.int64), np.where(arrs.valid, arrs.costs, 0)[order]], axis=1)
    v_pad = np.concatenate([np.zeros((n, 1)), v_sorted], axis=1)

    def exact(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact additive+activation bytes and value of plans given as levels in sorted item order."""
        add = c_sorted[np.arange(n)[None, :], levels].sum(axis=1)
        lowest = np.where(levels > 0, blocks_sorted[None, :], ref.num_blocks).min(axis=1)
        return add + arrs.suffix[lowest], v_pad[np.arange(n)[None, :], levels].sum(axis=1)

    lv_up = _backtrack(choice, w_up, snap_at, best_s, idx[rows, best_s])
    bytes_up, value_up = exact(lv_up)
    value_up = np.where(np.isfinite(vals[rows, best_s]) & (bytes_up <= free), value_up, -1.0)
    # Certificate by construction: the rounded-down table is a relaxation; when its optimal plan happens to fit
    # under the exact costs it is optimal for the real problem (it is usually the case, see bench/).
    lv_down = _backtrack(bound_choice, w_down, snap_at, bound_s, idx[rows, bound_s])
    bytes_down, value_down = exact(lv_down)
    value_down = np.where(np.isfinite(upper) & (bytes_down <= free), value_down, -1.0)
    single_val, single_item, single_opt = best_single(arrs, free)
    elapsed = time.perf_counter() - t0

    plans = []
    for c in range(m):
        p = problems[c]
        use_down = value_down[c] > value_up[c]
        levels = lv_down[c] if use_down else lv_up[c]
        value = float(max(value_up[c], value_down[c]))
        modules: dict[str, int] = {}
        for pos in np.nonzero(levels)[0]:
            it = ref.items[int(order[pos])]
            modules[it.name] = it.ranks[int(levels[pos]) - 1]
        if single_val[c] > value:  # the grid rounding squeezed out every plan, but one module fits exactly
            it = ref.items[int(single_item[c])]
            modules = {it.name: it.ranks[int(single_opt[c])]}
            value = float(single_val[c])
        tol = 1e-9 * max(1.0, abs(float(upper[c])))
        proven = value >= float(upper[c]) - tol
        status = PlanStatus.OPTIMAL if proven else PlanStatus.FEASIBLE
        msg = f"quantum {q} B"
        if not proven:
            msg += f"; grid rounding: objective {value:.6g} vs upper bound {float(upper[c]):.6g}"
        plans.append(
            Plan(
                modules=modules,
                status=status,
                objective=value,
                predicted_bytes=0,
                budget=p.budget,
                backend=name,
                solve_time_s=elapsed / m,
                client=p.client,
                message=msg,
                bound=max(value, float(upper[c])),
            )
        )
    return plans


def _backtrack(choice: np.ndarray, w: np.ndarray, snap_at: np.ndarray, snap: np.ndarray, cell0: np.ndarray):
    """Chosen level (0 = untrained, o+1 = option o) of every sorted item, for every client at once.

    Client c reads snapshot ``snap[c]`` (items ``[0, snap_at[snap[c]])``) at cell ``cell0[c]`` and walks back.
    """
    n = choice.shape[0]
    m = len(snap)
    levels = np.zeros((m, n), dtype=np.int64)
    if n == 0 or m == 0:
        return levels
    w_pad = np.concatenate([np.zeros((n, 1), np.int64), w], axis=1)
    cell = cell0.astype(np.int64).copy()
    limit = snap_at[snap]
    for pos in range(n - 1, -1, -1):
        o = np.where(pos < limit, choice[pos, cell], 0).astype(np.int64)
        levels[:, pos] = o
        cell = cell - w_pad[pos, o]
    if np.any(cell < 0):  # pragma: no cover - would be a table bug
        raise SolverError("dp", "DP back-track left a negative capacity")
    return levels


def solve_batch(
    problems: Sequence[AllocationProblem], *, time_limit: float | None = None, name: str = "dp", impl: str = "auto"
) -> list[Plan]:
    """Solve problems, sharing one DP table per group of problems with the same items/blocks/quantum.

    The work is ``items x options x cells`` (at most ~300 M cell updates with the automatic grid, about a second
    natively); with ``time_limit`` the automatic grid is coarsened to fit it (see `resolved_quantum`).
    """
    if impl == "auto":
        impl = "native" if _knapsack is not None else "numpy"
    label = name if name != "dp" else f"dp-{impl}"
    out: list[Plan | None] = [None] * len(problems)
    for key, members in group_problems(problems, extra=lambda p: resolved_quantum(p, time_limit, impl)):
        q = key[-1]
        for k, plan in zip(members, _solve_group([problems[i] for i in members], q, impl, label), strict=True):
            out[k] = plan
    return [p for p in out if p is not None]
