"""DP specifics: native and numpy tables identical, batched solve == one-by-one, Llama-scale sanity."""

import numpy as np
import pytest

from solvers import AllocationProblem, Item, PlanStatus, solve, solve_many
from solvers.backends import dp
from tests.solvers._instances import llama_like

native = pytest.mark.skipif(dp._knapsack is None, reason="native extension solvers._knapsack not built")


@native
@pytest.mark.parametrize("want_choice", [True, False])
def test_native_tables_equal_numpy(want_choice):
    rng = np.random.default_rng(7)
    n, k, cells = 40, 3, 500
    w = rng.integers(0, 60, size=(n, k)).astype(np.int64)
    w[rng.random((n, k)) < 0.2] = cells  # disabled (padding) options
    v = rng.uniform(0, 5, size=(n, k))
    snap_at = np.array([0, 5, 17, 17, 40], dtype=np.int64)
    query = np.tile(np.arange(cells), (len(snap_at), 1))  # read every cell of every snapshot
    s1, c1 = dp.dp_tables(w, v, cells, snap_at, query, want_choice, impl="native")
    s2, c2 = dp.dp_tables(w, v, cells, snap_at, query, want_choice, impl="numpy")
    np.testing.assert_array_equal(s1, s2)
    if want_choice:
        np.testing.assert_array_equal(c1, c2)
    assert np.all(np.diff(s1, axis=1) >= 0)  # "at most c" tables are non-decreasing in capacity
    assert np.all(np.diff(s1, axis=0) >= 0)  # more items never hurt
    some = rng.integers(0, cells, size=(len(snap_at), 7))
    s3, _ = dp.dp_tables(w, v, cells, snap_at, some, False, impl="native")
    np.testing.assert_array_equal(s3, np.take_along_axis(s1, some, axis=1))


@native
def test_native_rejects_bad_buffers():
    w = np.zeros((2, 2), dtype=np.int64)
    v = np.zeros((2, 2))
    snap = np.array([2], dtype=np.int64)
    with pytest.raises(ValueError, match="out"):
        dp._knapsack.mck(w, v, 2, 2, 10, snap, np.zeros((1, 3), np.int64), np.zeros(2), None)
    with pytest.raises(ValueError, match="snap_at"):
        dp._knapsack.mck(w, v, 2, 2, 10, np.array([5], np.int64), np.zeros((1, 1), np.int64), np.zeros(1), None)
    with pytest.raises(ValueError, match="query cell 10"):
        dp._knapsack.mck(w, v, 2, 2, 10, snap, np.full((1, 1), 10, np.int64), np.zeros(1), None)


def test_auto_quantum_exact_grid_when_costs_share_a_divisor():
    base = llama_like(num_blocks=4)
    q = dp.auto_quantum(base)
    assert q > 1 and all(c % q == 0 for it in base.items for c in it.costs)
    odd = AllocationProblem(
        tuple(Item(f"m{i}", 0, (8,), (10**9 + 2 * i + 1,), (1.0,)) for i in range(4)), (0,), 0, 0, 10**10
    )
    # gcd 1 would need 4e9 cells: fall back to the coarse grid of 2**16 cells
    assert dp.auto_quantum(odd) == -(-sum(it.costs[0] for it in odd.items) // dp.DEFAULT_CELLS)


def _clients(n, seed=0):
    base = llama_like(num_blocks=8, seed=seed)
    rng = np.random.default_rng(seed)
    lo, hi = base.min_train_bytes(), base.max_train_bytes()
    budgets = rng.integers(lo - (hi - lo) // 10, hi, size=n)
    return [base.with_budget(int(b)).with_client(c) for c, b in enumerate(budgets)]


@pytest.mark.parametrize("impl", ["dp-numpy", pytest.param("dp-native", marks=native)])
def test_batched_equals_one_by_one(impl):
    probs = _clients(12, seed=1)
    batch = solve_many(probs, impl)
    for p, plan in zip(probs, batch, strict=True):
        single = solve(p, impl)
        assert plan.modules == single.modules and plan.status == single.status
        assert plan.client == p.client
        assert plan.predicted_bytes <= p.budget or plan.status is PlanStatus.INFEASIBLE


@native
def test_native_and_numpy_plans_identical_llama():
    probs = _clients(20, seed=2)
    a = solve_many(probs, "dp-native")
    b = solve_many(probs, "dp-numpy")
    assert [p.modules for p in a] == [p.modules for p in b]
    assert [p.status for p in a] == [p.status for p in b]


def test_llama_dp_vs_ilp_and_greedy():
    """Realistic magnitudes (GiB budgets): DP equals HiGHS' optimum (exact gcd grid here) and is certified."""
    probs = _clients(4, seed=4)
    for p in probs:
        exact = solve(p, "dp")
        ilp = solve(p, "pulp-highs", time_limit=20)
        greedy = solve(p, "greedy")
        if exact.status is PlanStatus.INFEASIBLE:
            assert ilp.status is PlanStatus.INFEASIBLE and greedy.status is PlanStatus.INFEASIBLE
            continue
        assert exact.predicted_bytes <= p.budget and greedy.predicted_bytes <= p.budget
        assert greedy.objective <= ilp.objective + 1e-9
        assert exact.objective <= ilp.objective + 1e-9
        assert exact.status is PlanStatus.OPTIMAL
        assert exact.objective == pytest.approx(ilp.objective, rel=1e-9)
        coarse = solve(
            AllocationProblem(p.items, p.block_costs, p.static_bytes, p.head_bytes, p.budget, quantum=78_001)
        )
        assert coarse.predicted_bytes <= p.budget and coarse.objective <= ilp.objective + 1e-9
        assert coarse.objective >= 0.99 * ilp.objective  # grid rounding loses a sliver at most


def test_solve_many_mixed_models_keeps_order():
    a = _clients(5, seed=5)
    b = [p.with_budget(p.budget // 2 + p.fixed_bytes // 2) for p in _clients(5, seed=6)]  # other values/costs
    mixed = [x for pair in zip(a, b, strict=True) for x in pair]
    plans = solve_many(mixed, "dp")
    for p, plan in zip(mixed, plans, strict=True):
        assert plan.modules == solve(p, "dp").modules
        assert plan.budget == p.budget


def test_time_limit_coarsens_only_the_automatic_grid():
    base = llama_like(num_blocks=16, seed=3)
    p = base.with_budget(base.fixed_bytes + (base.max_train_bytes() - base.fixed_bytes) // 3)
    exact_q = dp.resolved_quantum(p)
    assert dp.resolved_quantum(p, time_limit=1e-3, impl="numpy") > exact_q
    assert dp.resolved_quantum(p, time_limit=1e6, impl="native") == exact_q
    fixed = AllocationProblem(p.items, p.block_costs, p.static_bytes, p.head_bytes, p.budget, quantum=4096)
    assert dp.resolved_quantum(fixed, time_limit=1e-3) == 4096  # an explicit grid is the user's call
    fast = solve(p, "dp", time_limit=0.05)
    assert fast.predicted_bytes <= p.budget and fast.objective <= solve(p, "dp").objective + 1e-9
