"""Allocation strategies: budgets respected, seeded determinism, layer counts, pattern statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from solvers import InfeasibleBudgetError, available_backends
from solvers.importance import geometric_pattern
from solvers.memory import MemoryModel, ModuleSpec
from solvers.strategies import available_strategies, plan_clients

LAYER_STRATEGIES = [s for s in available_strategies() if s.startswith(("fedhello", "fedra"))]


def synthetic(L: int = 12, static: int = 10_000, block_cost: int = 0, rank: int = 8) -> MemoryModel:
    """Two modules (q, v sharing their input) per layer; additive when block_cost = 0."""
    mods = tuple(ModuleSpec(f"layers.{j}.{m}", j, 16, 16, rank, kind=f"layers.#.{m}", group="qv", order=o)
                 for j in range(L) for o, m in enumerate("qv"))
    return MemoryModel(modules=mods, static_bytes=static, head_bytes=100, block_costs=(block_cost,) * L,
                       param_train_bytes={m.name: 50 for m in mods}, rank_act_bytes={m.name: 10 for m in mods},
                       input_bytes={m.name: 20 for m in mods}, rank_scaling=True)


LAYER = 2 * (50 + 10) + 20  # one synthetic layer at full rank: two modules, one shared input


@pytest.fixture(scope="module")
def bert6() -> MemoryModel:
    cfg = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 200}
    return MemoryModel.from_config(cfg, batch_size=4, seq_len=32, rank=8)


def _budgets(mm: MemoryModel, n: int = 8) -> dict[int, int]:
    lo, hi = mm.min_trainable_bytes(mm.default_rank_choices()), mm.full_bytes()
    lo = max(lo, mm.min_trainable_bytes())
    return {c: int(lo + (hi - lo) * f) for c, f in enumerate(np.linspace(0, 1.05, n))}


@pytest.mark.parametrize("strategy", available_strategies())
def test_every_plan_fits_and_is_seeded(strategy, bert6):
    budgets = _budgets(bert6)
    a = plan_clients(strategy, bert6, budgets, seed=7)
    b = plan_clients(strategy, bert6, budgets, seed=7)
    assert list(a) == list(budgets)
    for c, plan in a.items():
        assert plan.client == c and plan.budget == budgets[c]
        assert plan.modules == b[c].modules
        assert plan.predicted_bytes == bert6.predict(plan.modules)
        if strategy == "full":
            assert plan.modules == bert6.full_plan()
        else:
            assert plan.modules, (strategy, c)  # every budget >= the minimum trains something
            assert bert6.predict(plan.modules) <= budgets[c], (strategy, c)


@pytest.mark.parametrize("strategy", LAYER_STRATEGIES)
def test_layer_counts_are_what_each_client_affords(strategy, bert6):
    budgets = _budgets(bert6)
    plans = plan_clients(strategy, bert6, budgets, seed=3)
    L = bert6.num_blocks
    counts = []
    for c, b in budgets.items():
        top_fit = [n for n in range(1, L + 1)
                   if bert6.predict([m.name for m in bert6.modules if m.block >= L - n]) <= b]
        afford = max(top_fit, default=0)
        layers = {bert6.spec(m).block for m in plans[c].modules}
        if afford:
            assert len(layers) == afford, (c, layers, afford)
            per_layer = Counter(bert6.spec(m).block for m in plans[c].modules)
            assert all(v == 2 for v in per_layer.values())  # whole layers
        counts.append(len(layers))
    assert counts == sorted(counts)  # budgets increase with the client id here


def test_rgd_inclusion_follows_the_pattern():
    """algorithms.md oracle 9: over many seeded draws, inclusion frequency is ordered like the pattern."""
    mm = synthetic()
    n_clients, n = 3000, 3
    budgets = {c: mm.static_bytes + mm.head_bytes + n * LAYER for c in range(n_clients)}
    plans = plan_clients("fedhello-rgd:bottleneck", mm, budgets, seed=0)
    freq = np.zeros(12)
    for p in plans.values():
        layers = {mm.spec(m).block for m in p.modules}
        assert len(layers) == n
        for layer in layers:
            freq[layer] += 1
    w = geometric_pattern(12, "bottleneck")
    ends, middle = freq[[0, 1, 2, 9, 10, 11]], freq[[5, 6, 7]]
    assert ends.min() > middle.max()  # ends favoured, middle rarely trained
    assert np.corrcoef(freq, w)[0, 1] > 0.9
    tri = plan_clients("fedhello-rgd:triangle", mm, dict(list(budgets.items())[:1000]), seed=0)
    ftri = np.bincount([mm.spec(m).block for p in tri.values() for m in p.modules if m.endswith(".q")], minlength=12)
    assert ftri[-3:].sum() > 2 * ftri[:3].sum()
    other = plan_clients("fedhello-rgd:bottleneck", mm, dict(list(budgets.items())[:50]), seed=1)
    assert any(other[c].modules != plans[c].modules for c in other)


def test_gd_rotates_ties_across_clients():
    mm = synthetic()
    budgets = {c: mm.static_bytes + mm.head_bytes + 3 * LAYER for c in range(6)}
    plans = plan_clients("fedhello-gd:bottleneck", mm, budgets)
    count = Counter(mm.spec(m).block for p in plans.values() for m in p.modules if m.endswith(".q"))
    assert count == {layer: 3 for layer in (0, 1, 2, 9, 10, 11)}  # 6 tied top layers x 3 picks each over 6 clients


def test_fedra_random_layers_seeded_per_client():
    mm = synthetic()
    budgets = {c: mm.static_bytes + mm.head_bytes + 4 * LAYER for c in range(40)}
    a = plan_clients("fedra", mm, budgets, seed=5)
    assert all(a[c].modules == p.modules for c, p in plan_clients("fedra", mm, budgets, seed=5).items())
    sets = {frozenset(p.modules) for p in a.values()}
    assert len(sets) > 20
    assert all(len({mm.spec(m).block for m in p.modules}) == 4 for p in a.values())


def test_fim_strategy_follows_importance():
    mm = synthetic()
    level = {4: 10.0, 5: 10.0, 0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}  # three FIM clusters: high, mid, low (0.1)
    importance = {m.name: level.get(m.block, 0.1) for m in mm.modules}
    budgets = {c: mm.static_bytes + mm.head_bytes + 2 * LAYER for c in range(1000)}
    plans = plan_clients("fedhello-fim", mm, budgets, seed=0, importance=importance)
    freq = Counter(mm.spec(m).block for p in plans.values() for m in p.modules if m.endswith(".q"))
    high, mid, low = (np.mean([freq[j] for j in js]) for js in ((4, 5), (0, 1, 2, 3), range(6, 12)))
    assert high > mid > low  # cluster weights 3 : 2 : 1 ordered by centroid
    assert min(freq[4], freq[5]) > max(freq[j] for j in range(6, 12))


def test_fedpilot_is_best_under_the_problem(bert6):
    """Knapsack value >= any other strategy's plan that also fits the problem's (conservative) costs."""
    rng = np.random.default_rng(0)
    importance = {m: float(rng.random()) for m in bert6.module_names}
    budgets = _budgets(bert6)
    pilot = plan_clients("fedpilot", bert6, budgets, importance=importance)
    for strategy in ("fedra", "fedhello-gd:triangle", "uniform-min", "hetlora"):
        other = plan_clients(strategy, bert6, budgets, importance=importance)
        for c, b in budgets.items():
            prob = bert6.problem(b, values=importance)
            plan = {m: bert6.spec(m).max_rank for m in other[c].modules}
            if prob.cost(plan) <= b:
                assert prob.value(pilot[c].modules) >= prob.value(plan) - 1e-9


@pytest.mark.parametrize("backend", ["greedy", "pulp", "cvxpy"])
def test_fedpilot_other_backends_fit(backend, bert6):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    budgets = _budgets(bert6, 4)
    for c, p in plan_clients("fedpilot", bert6, budgets, backend=backend, time_limit=10).items():
        assert bert6.predict(p.modules) <= budgets[c]


def test_hetlora_rank_grows_with_budget(bert6):
    budgets = _budgets(bert6)
    plans = plan_clients("hetlora", bert6, budgets, rank_choices=(1, 2, 4, 8))
    full = [p for p in plans.values() if len(p.modules) == len(bert6.modules)]
    ranks = [max(p.modules.values()) for p in full]  # among clients training every module, rank grows
    assert ranks == sorted(ranks) and ranks[-1] == 8
    counts = [len(p.modules) for p in plans.values()]  # below that, more budget never trains fewer modules
    assert counts == sorted(counts)
    assert full and all(len(set(p.modules.values())) == 1 for p in full)


def test_uniform_min_gives_everyone_the_smallest_plan(bert6):
    budgets = _budgets(bert6)
    plans = plan_clients("uniform-min", bert6, budgets)
    smallest = plan_clients("fedpilot", bert6, {0: budgets[0]})[0]
    assert all(p.modules == smallest.modules for p in plans.values())


def test_infeasible_budget_names_client_budget_minimum(bert6):
    for strategy in ("fedpilot", "fedra", "hetlora", "uniform-min", "fedhello-rgd:uniform"):
        # hetlora may drop to rank 1: its minimum is lower (adapters sliced to the rank here)
        need = bert6.min_trainable_bytes(bert6.default_rank_choices() if strategy == "hetlora" else None)
        budgets = {0: need, 7: need - 1}
        assert plan_clients(strategy, bert6, {0: need})[0].modules
        with pytest.raises(InfeasibleBudgetError) as info:
            plan_clients(strategy, bert6, budgets)
        assert info.value.client == 7 and info.value.budget == need - 1
        assert info.value.min_bytes >= need
        assert "client 7" in str(info.value)
    assert plan_clients("full", bert6, {3: 0})[3].modules == bert6.full_plan()  # full ignores the budget


def test_unknown_strategy_lists_names(bert6):
    with pytest.raises(ValueError, match="fedpilot.*fedhello-rgd:bottleneck"):
        plan_clients("fedmagic", bert6, {0: 10**9})
    with pytest.raises(ValueError, match="fedhello-gd:zigzag"):
        plan_clients("fedhello-gd:zigzag", bert6, {0: 10**9})


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_rank_strategies_give_a_low_tier_the_largest_rank_that_fits(strategy, bert6):
    """Issue 15 item 2: a client that affords a few top layers at rank 1 affords them at rank 8 too."""
    choices = (1, 2, 4, 8)
    top = [sp.name for sp in bert6.modules if sp.block == bert6.num_blocks - 1]
    at8 = bert6.predict({m: 8 for m in top})
    assert not bert6.predict({m: 1 for m in bert6.module_names}) <= at8  # not every module at rank 1
    plan = plan_clients(strategy, bert6, {0: at8}, rank_choices=choices)[0]
    assert set(plan.modules) >= set(top), plan.modules
    assert min(plan.modules.values()) == 8, (plan.modules, plan.message)
    assert plan.predicted_bytes <= at8
    # the rank is the largest that fits the chosen modules: one byte less and rank 8 no longer fits
    tight = plan_clients(strategy, bert6, {0: at8 - 1}, rank_choices=choices)[0]
    assert tight.modules and max(tight.modules.values()) < 8 or len(tight.modules) < len(top)


def test_strategy_traits_registry():
    from solvers.errors import ProblemError
    from solvers.strategies import strategy_traits

    assert strategy_traits("fedra").randomised and strategy_traits("fedhello-rgd:triangle").randomised
    assert strategy_traits("fedhello-fim").needs_importance and strategy_traits("fedpilot").needs_importance
    assert not strategy_traits("full").budgeted and strategy_traits("fedra").budgeted
    assert not strategy_traits("fedhello-gd:triangle").randomised and not strategy_traits("hetlora").randomised
    assert strategy_traits("flexlora").ranks and not strategy_traits("fedpilot").ranks
    with pytest.raises(ProblemError, match="unknown strategy 'nope'"):
        strategy_traits("nope")


def test_unknown_backend_is_one_error_type_everywhere(bert6):
    from solvers import solve
    from solvers.errors import ProblemError

    budgets = _budgets(bert6, 2)
    with pytest.raises(ProblemError, match="unknown solver backend 'simplex'"):
        plan_clients("fedpilot", bert6, budgets, backend="simplex")
    with pytest.raises(ProblemError, match="unknown solver backend 'simplex'"):
        solve(bert6.problem(budgets[0]), "simplex")


@pytest.mark.parametrize("backend", ["dp", "greedy", "pulp", "cvxpy"])
@pytest.mark.parametrize("strategy", ["fedpilot", "fk-adaptive"])
@pytest.mark.parametrize("floor", [0.5, 1.0])
def test_coverage_floor_keeps_only_shared_modules(floor, strategy, backend, bert6):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    rng = np.random.default_rng(3)
    importance = {m: float(rng.random()) + 0.1 for m in bert6.module_names}
    budgets = _budgets(bert6)
    free = plan_clients(strategy, bert6, budgets, importance=importance, backend=backend, time_limit=10)
    held = plan_clients(strategy, bert6, budgets, importance=importance, backend=backend, time_limit=10,
                        min_coverage=floor)
    # a module is trainable by every client at least as rich as the poorest client whose plan holds it
    poorest = {}
    for c, p in held.items():
        for m in p.modules:
            poorest[m] = min(poorest.get(m, budgets[c]), budgets[c])
    assert poorest and all(sum(b >= lo for b in budgets.values()) >= floor * len(budgets) for lo in poorest.values())
    # the floor bites here: without it some module is held only by clients richer than the floor allows
    assert len({m for p in free.values() for m in p.modules}) > len(poorest)
    if floor == 1.0:  # exactly the poorest client's modules, and every client trains all of them
        low = min(budgets, key=budgets.get)
        assert all(set(p.modules) == set(held[low].modules) for p in held.values())
    for c, p in held.items():
        assert p.modules and bert6.predict(p.modules) <= budgets[c]
        assert p.predicted_bytes == bert6.predict(p.modules)
        assert p.lowest_block == min(bert6.spec(m).block for m in p.modules)
        assert "coverage floor" in p.message
        assert p.objective == pytest.approx(sum(importance[m] for m in p.modules))


def test_coverage_floor_when_the_knapsack_optima_are_not_nested():
    """The middle budget's optimum (layer 2, valued 5x) shares no module with the poorest's (layer 5, the only one
    it affords): counting plans would keep nothing; the floor 1 keeps the poorest's modules for everyone."""
    mm = synthetic(L=6, static=1000, block_cost=100)
    importance = {m: (5.0 if mm.spec(m).block == 2 else 1.0) for m in mm.module_names}
    budgets = {0: 1340, 1: 1640, 2: 2540}
    free = plan_clients("fk-adaptive", mm, budgets, importance=importance, rank_choices=[8])
    assert {mm.spec(m).block for m in free[0].modules} == {5} and {mm.spec(m).block for m in free[1].modules} == {2}
    held = plan_clients("fk-adaptive", mm, budgets, importance=importance, rank_choices=[8], min_coverage=1.0)
    assert all(set(p.modules) == set(free[0].modules) for p in held.values())
    half = plan_clients("fk-adaptive", mm, budgets, importance=importance, rank_choices=[8], min_coverage=0.6)
    # 0.6 of 3 clients: the middle client's layer 2 (clients 1 and 2 = 2/3) stays, the richest's extras go
    assert {mm.spec(m).block for m in half[1].modules} == {2}
    assert {mm.spec(m).block for m in half[2].modules} <= {2, 5} and all(mm.predict(p.modules) <= budgets[c]
                                                                         for c, p in half.items())


def test_coverage_floor_zero_is_the_plain_knapsack(bert6):
    budgets = _budgets(bert6)
    a = plan_clients("fk-adaptive", bert6, budgets)
    b = plan_clients("fk-adaptive", bert6, budgets, min_coverage=0.0)
    assert {c: p.modules for c, p in a.items()} == {c: p.modules for c, p in b.items()}


@pytest.mark.parametrize("strategy,floor", [("fedra", 0.5), ("hetlora", 1.0), ("fedpilot", 1.5),
                                            ("fk-adaptive", -0.1), ("fk-adaptive", True)])
def test_coverage_floor_bad_input_is_a_clear_error(strategy, floor, bert6):
    from solvers.errors import ProblemError

    with pytest.raises(ProblemError, match="min_coverage") as exc:
        plan_clients(strategy, bert6, _budgets(bert6), min_coverage=floor)
    assert repr(floor) in str(exc.value)
