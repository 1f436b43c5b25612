"""DP specifics: native and numpy tables identical, batched solve == one-by-one, Llama-scale sanity."""

import numpy as np
import pytest

from solvers import PlanStatus, solve, solve_many
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
    s1, c1 = dp.dp_tables(w, v, cells, snap_at, want_choice, impl="native")
    s2, c2 = dp.dp_tables(w, v, cells, snap_at, want_choice, impl="numpy")
    np.testing.assert_array_equal(s1, s2)
    if want_choice:
        np.testing.assert_array_equal(c1, c2)
    assert np.all(np.diff(s1, axis=1) >= 0)  # "at most c" tables are non-decreasing in capacity
    assert np.all(np.diff(s1, axis=0) >= 0)  # more items never hurt


@native
def test_native_rejects_bad_buffers():
    w = np.zeros((2, 2), dtype=np.int64)
    v = np.zeros((2, 2))
    with pytest.raises(ValueError, match="snaps"):
        dp._knapsack.mck(w, v, 2, 2, 10, np.array([2], dtype=np.int64), np.zeros(3), None)
    with pytest.raises(ValueError, match="snap_at"):
        dp._knapsack.mck(w, v, 2, 2, 10, np.array([5], dtype=np.int64), np.zeros(10), None)


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
    """Realistic magnitudes (GiB budgets, ~60 KB grid): DP within its certificate of HiGHS' optimum."""
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
        # grid rounding loses at most a sliver: 1% of the optimum here
        assert exact.objective >= 0.99 * ilp.objective
        if exact.status is PlanStatus.OPTIMAL:
            assert exact.objective == pytest.approx(ilp.objective, rel=1e-9)
