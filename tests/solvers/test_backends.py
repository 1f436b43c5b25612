"""One suite over every backend: brute force on random instances (hypothesis), budgets, infeasibility, time limits."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings

import solvers
from solvers import EXACT_BACKENDS, AllocationProblem, Item, PlanStatus, solve, solve_many
from tests.solvers._instances import brute_force, llama_like, problems

BACKENDS = solvers.available_backends()
_ILP = ("pulp", "pulp-cbc", "pulp-highs", "cvxpy")
# ILP solves cost ~10-30 ms each (model build + solver start), DP/greedy ~1 ms: fewer examples for ILPs.
_EXAMPLES = {b: (15 if b in _ILP else 40) for b in BACKENDS}
_TOL = 1e-9


def test_every_known_backend_is_available_here():
    from solvers.backends import dp

    # pulp and cvxpy+HiGHS are hard dependencies; only the native DP depends on a compiler at install time.
    expected = set(solvers.backend_names()) - (set() if dp._knapsack is not None else {"dp-native"})
    assert set(BACKENDS) == expected


def _check_plan(problem: AllocationProblem, plan) -> None:
    assert plan.budget == problem.budget and plan.client == problem.client
    assert plan.predicted_bytes == problem.cost(plan.modules)
    assert plan.objective == pytest.approx(problem.value(plan.modules), abs=_TOL)
    if plan.status is not PlanStatus.INFEASIBLE:
        assert plan.predicted_bytes <= problem.budget, "plan exceeds its budget under exact costs"
        assert plan.lowest_block == problem.lowest_block(plan.modules)
    assert all(r > 0 for r in plan.modules.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_instances_match_brute_force(backend):
    @settings(max_examples=_EXAMPLES[backend], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems())
    def check(problem):
        opt, _ = brute_force(problem)
        plan = solve(problem, backend)
        _check_plan(problem, plan)
        if problem.budget < problem.min_train_bytes():
            assert plan.status is PlanStatus.INFEASIBLE and plan.modules == {}
            return
        assert plan.objective <= opt + _TOL
        if backend in EXACT_BACKENDS:
            # costs <= 400 bytes x 12 options: the automatic grid is 1 byte, so the DP is exact here
            assert plan.status is PlanStatus.OPTIMAL
            assert plan.objective == pytest.approx(opt, abs=1e-7)
        else:
            assert plan.status is PlanStatus.FEASIBLE

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_non_decreasing_in_budget(backend):
    @settings(max_examples=max(5, _EXAMPLES[backend] // 3), deadline=None)
    @given(problems())
    def check(problem):
        # every module at its costliest option (max_train_bytes uses the largest *rank*, which need not cost most)
        top = problem.fixed_bytes + sum(max(it.costs) for it in problem.items)
        top += problem.activation_bytes(min(it.block for it in problem.items))
        budgets = sorted({problem.fixed_bytes, problem.min_train_bytes(), (problem.min_train_bytes() + top) // 2, top})
        plans = solve_many([problem.with_budget(b) for b in budgets], backend)
        objs = [p.objective for p in plans]
        for p, b in zip(plans, budgets, strict=True):
            _check_plan(problem.with_budget(b), p)
        if backend in EXACT_BACKENDS:
            assert all(a <= b + _TOL for a, b in zip(objs, objs[1:], strict=False)), objs
        # At the top budget everything fits: every backend (greedy included) must train every module at max value.
        best_all = sum(max(it.values) for it in problem.items)
        assert objs[-1] == pytest.approx(best_all, abs=1e-7)

    check()


@settings(max_examples=40, deadline=None)
@given(problems())
def test_greedy_never_beats_exact(problem):
    exact = solve(problem, "dp")
    greedy = solve(problem, "greedy")
    assert greedy.objective <= exact.objective + _TOL


@settings(max_examples=30, deadline=None)
@given(problems())
def test_coarse_grid_dp_fits_and_certificate_is_sound(problem):
    """Costs rounded up to a coarse grid: plans still fit exactly; 'optimal' only when truly optimal."""
    opt, _ = brute_force(problem)
    for q in (7, 64):
        coarse = AllocationProblem(
            problem.items, problem.block_costs, problem.static_bytes, problem.head_bytes, problem.budget, quantum=q
        )
        for backend in [b for b in ("dp-native", "dp-numpy") if b in BACKENDS]:
            plan = solve(coarse, backend)
            _check_plan(coarse, plan)
            if plan.status is PlanStatus.INFEASIBLE:
                continue
            assert plan.objective <= opt + _TOL
            assert plan.bound is not None and plan.bound >= opt - _TOL  # the relaxation bound is a real bound
            if plan.status is PlanStatus.OPTIMAL:
                assert plan.objective == pytest.approx(opt, abs=1e-7)
            else:
                assert plan.status is PlanStatus.FEASIBLE


def _small():
    items = (
        Item("a", 0, (4, 8), (120, 200), (1.0, 1.5)),
        Item("b", 1, (8,), (50,), (0.5,)),
        Item("c", 2, (4, 8), (30, 60), (0.25, 0.375)),
    )
    return AllocationProblem(items, (900, 400, 300), 1000, 40, 10_000, client=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_at_minimum_and_empty_budget(backend):
    p = _small()
    need = p.min_train_bytes()
    assert need == 1000 + 40 + 30 + 300  # module c at rank 4 with only block 2's activations
    below = solve(p.with_budget(need - 1), backend)
    assert below.status is PlanStatus.INFEASIBLE and below.modules == {} and below.objective == 0
    assert "below the minimum" in below.message
    at = solve(p.with_budget(need), backend)
    assert at.status in (PlanStatus.OPTIMAL, PlanStatus.FEASIBLE)
    assert at.modules == {"c": 4} and at.predicted_bytes == need
    empty = solve(p.with_budget(0), backend)
    assert empty.status is PlanStatus.INFEASIBLE and empty.modules == {}
    none = AllocationProblem((), (5,), 10, 0, 10)
    assert solve(none, backend).status is PlanStatus.OPTIMAL and solve(none, backend).modules == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_costs_pick_top_values(backend):
    """All modules in one block with equal cost: the plan is the top-n by value (algorithms.md sec. 7.11)."""
    values = [0.3, 0.9, 0.1, 0.7, 0.5, 0.8]
    items = tuple(Item(f"m{i}", 0, (8,), (100,), (v,)) for i, v in enumerate(values))
    p = AllocationProblem(items, (1000,), 0, 0, 1000 + 3 * 100 + 99)
    plan = solve(p, backend)
    assert set(plan.modules) == {"m1", "m5", "m3"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limit_respected(backend):
    base = llama_like(num_blocks=16, seed=3)
    p = base.with_budget(base.fixed_bytes + (base.max_train_bytes() - base.fixed_bytes) // 3)
    limit = 0.5
    t0 = time.perf_counter()
    plan = solve(p, backend, time_limit=limit)
    wall = time.perf_counter() - t0
    # ILP: model build + solver process start come on top of the solver's own limit; 3 s slack on a busy 2-core box.
    assert wall < limit + 3.0, f"{backend} took {wall:.2f}s with time_limit={limit}"
    assert plan.status in (PlanStatus.OPTIMAL, PlanStatus.FEASIBLE, PlanStatus.TIMEOUT)
    _check_plan(p, plan)


@pytest.mark.parametrize("kind", ["incumbent", "none"])
def test_ilp_timeout_maps_to_timeout_status(monkeypatch, kind):
    """A solver stopped by its limit: status timeout, with the incumbent when it had one (else empty)."""
    import numpy as np

    from solvers.backends import ilp

    p = _small()
    # incumbent: train module c at rank 8 (option index 4 in the flattened (a4, a8, b8, c4, c8) list)
    xval = np.array([0, 0, 0, 0, 1.0])
    monkeypatch.setattr(ilp, "_solve_pulp", lambda *a, **k: (kind, xval if kind == "incumbent" else None))
    plan = solve(p, "pulp-highs", time_limit=1.0)
    assert plan.status is PlanStatus.TIMEOUT
    assert plan.modules == ({"c": 8} if kind == "incumbent" else {})
    assert plan.predicted_bytes <= p.budget and "time limit" in plan.message


def test_greedy_repairs_fragmentation_by_downgrading():
    """Ratio order takes X at rank 16 (60 B) and leaves 40 B, too little for Y (45 B); the exchange pass drops X to
    rank 8 (frees 10 B, loses 1.5) to fit Y (+4.4): 9.4, the optimum (X8 + Y = 95 B <= 100 B)."""
    items = (Item("X", 0, (8, 16), (50, 60), (5.0, 6.5)), Item("Y", 0, (8,), (45,), (4.4,)))
    p = AllocationProblem(items, (0,), 0, 0, 100)
    plan = solve(p, "greedy")
    assert plan.modules == {"X": 8, "Y": 8}
    assert plan.objective == pytest.approx(9.4) == solve(p, "dp").objective
