import json
import math

import numpy as np
import pytest

import solvers
from solvers import (
    AllocationProblem,
    InfeasibleBudgetError,
    Item,
    Plan,
    PlanStatus,
    ProblemError,
    SolverError,
    check_feasible,
    format_bytes,
    solve,
)


def _problem(budget=10_000):
    rng = np.random.default_rng(1)
    items = tuple(
        Item(f"m{i}", i % 3, (4, 8), (int(c), int(c) * 2), (float(v), float(v) * 1.5))
        for i, (c, v) in enumerate(zip(rng.integers(10, 100, 6), rng.uniform(0.1, 1, 6), strict=True))
    )
    return AllocationProblem(items, (300, 200, 100), 1000, 50, budget, client="c7")


def test_cost_is_non_additive_through_lowest_block():
    p = _problem()
    a = p.items[0]  # block 0
    b = p.items[2]  # block 2
    base = p.fixed_bytes
    assert p.cost({}) == base
    assert p.cost({b.name: 4}) == base + b.costs[0] + 100
    assert p.cost({a.name: 8}) == base + a.costs[1] + 600
    assert p.cost({a.name: 8, b.name: 4}) == base + a.costs[1] + b.costs[0] + 600
    assert p.cost({a.name: 0, b.name: 4}) == p.cost({b.name: 4})  # rank 0 = not trained
    assert p.lowest_block({a.name: 8, b.name: 4}) == 0
    assert p.lowest_block({}) is None
    assert p.value({a.name: 8, b.name: 4}) == pytest.approx(a.values[1] + b.values[0])


def test_min_and_max_train_bytes():
    p = _problem()
    singles = [p.cost({it.name: it.ranks[0]}) for it in p.items]
    assert p.min_train_bytes() == min(singles)
    everything = {it.name: it.ranks[-1] for it in p.items}
    assert p.max_train_bytes() == p.cost(everything)
    assert p.is_feasible(everything) == (p.cost(everything) <= p.budget)


def test_restrict_and_with_budget():
    p = _problem()
    sub = p.restrict(["m1", "m4"])
    assert [it.name for it in sub.items] == ["m1", "m4"]
    assert sub.block_costs == p.block_costs and sub.client == "c7"
    assert p.with_budget(5).budget == 5 and p.with_budget(5).items == p.items
    with pytest.raises(ProblemError, match="'nope'"):
        p.restrict(["m1", "nope"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ranks": (8, 4)}, "strictly increasing"),
        ({"ranks": (0, 4)}, "0"),
        ({"costs": (5,)}, "same length"),
        ({"costs": (5, -1)}, "-1"),
        ({"costs": (5, 2.5)}, "2.5"),
        ({"values": (1.0, -0.5)}, "-0.5"),
        ({"values": (1.0, math.nan)}, "nan"),
        ({"block": -1}, "-1"),
        ({"name": ""}, "''"),
        ({"ranks": ()}, "at least one"),
    ],
)
def test_item_validation(kwargs, fragment):
    args = {"name": "q", "block": 0, "ranks": (4, 8), "costs": (5, 9), "values": (1.0, 2.0)} | kwargs
    with pytest.raises(ProblemError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Item(**args)


def test_problem_validation():
    it = Item("q", 2, (4,), (5,), (1.0,))
    with pytest.raises(ProblemError, match="block 2 is out of range"):
        AllocationProblem((it,), (1, 1), 0, 0, 10)
    with pytest.raises(ProblemError, match="duplicate module name 'q'"):
        AllocationProblem((it, it), (1, 1, 1), 0, 0, 10)
    with pytest.raises(ProblemError, match="-3"):
        AllocationProblem((it,), (1, -3, 1), 0, 0, 10)
    with pytest.raises(ProblemError, match="budget"):
        AllocationProblem((it,), (1, 1, 1), 0, 0, -10)
    with pytest.raises(ProblemError, match="quantum"):
        AllocationProblem((it,), (1, 1, 1), 0, 0, 10, quantum=0)
    p = AllocationProblem((it,), (1, 1, 1), 0, 0, 10)
    with pytest.raises(ProblemError, match="'k'"):
        p.cost({"k": 4})
    with pytest.raises(ProblemError, match="rank 16"):
        p.cost({"q": 16})
    with pytest.raises(ProblemError, match="-4"):
        p.cost({"q": -4})


def test_problem_is_hashable_and_frozen():
    p = _problem()
    assert hash(p) == hash(_problem())
    with pytest.raises(AttributeError):
        p.budget = 3  # type: ignore[misc]


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ProblemError) as info:
        solve(_problem(), "simplex-magic")
    assert "'simplex-magic'" in str(info.value)
    for name in ("dp", "greedy", "pulp-highs", "cvxpy"):
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_time_limit_rejected():
    with pytest.raises(ProblemError, match="-1"):
        solve(_problem(), "dp", time_limit=-1)


def test_infeasible_error_names_client_budget_minimum():
    base = _problem()
    p = base.with_budget(base.min_train_bytes() - 1)
    with pytest.raises(InfeasibleBudgetError) as info:
        check_feasible(p)
    err = info.value
    assert err.client == "c7" and err.budget == p.budget and err.min_bytes == p.min_train_bytes()
    assert f"client c7: budget {format_bytes(p.budget)} is below the minimum {format_bytes(err.min_bytes)}" in str(err)
    check_feasible(p.with_budget(p.min_train_bytes()))  # exactly at the minimum: no error


def test_plan_json_round_trip():
    p = _problem()
    plan = solve(p, "dp")
    data = json.loads(json.dumps(plan.to_dict()))
    back = Plan.from_dict(data)
    assert back == plan
    assert back.status is PlanStatus(plan.status)
    assert plan.layers_trained(p) == sorted({p.item(n).block for n in plan.modules})
    with pytest.raises(ProblemError, match="'great'"):
        Plan.from_dict(data | {"status": "great"})
    with pytest.raises(ProblemError, match="'modules'"):
        Plan.from_dict({k: v for k, v in data.items() if k != "modules"})


def test_native_backend_unavailable_is_typed(monkeypatch):
    from solvers.backends import dp

    monkeypatch.setattr(dp, "_knapsack", None)
    with pytest.raises(solvers.BackendUnavailableError) as info:
        solve(_problem(), "dp-native")
    assert isinstance(info.value, SolverError) and "dp-native" in str(info.value)
    assert "dp-native" not in solvers.available_backends()
    assert solve(_problem(), "dp").backend == "dp-numpy"  # auto falls back


def test_ilp_failure_is_solver_error(monkeypatch):
    import pulp

    def boom(self, solver=None, **kw):
        raise pulp.PulpSolverError("simulated crash")

    monkeypatch.setattr(pulp.LpProblem, "solve", boom)
    with pytest.raises(SolverError) as info:
        solve(_problem(), "pulp-cbc")
    assert "pulp" in str(info.value) and "simulated crash" in str(info.value) and "c7" in str(info.value)
    assert not isinstance(info.value, InfeasibleBudgetError)
