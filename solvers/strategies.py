"""Heterogeneous LoRA allocation strategies: one `Plan` per client from its memory budget.

* ``fedpilot``: knapsack maximising importance (Fed-pilot, algorithms.md sec. 1): the memory model's
  `AllocationProblem` solved by `solvers.solve_many` (any backend).
* ``fedhello-gd:<pattern>``, ``fedhello-rgd:<pattern>``, ``fedhello-fim`` (Fed-HeLLo, sec. 2): layer-level
  allocation. A client affords ``n_k`` layers (the most layers whose cheapest placement, the top ``n_k``
  layers, fits its budget); which layers follows a preference order: GD = layers by pattern weight, ties
  rotated across clients; RGD = a seeded weighted draw without replacement (numpy ``choice(p=pattern)``);
  FIM = RGD with probabilities from the FIM clusters of the layer importance (bottleneck when no
  importance is known yet). Layers are taken in preference order while the chosen set can still be
  completed to ``n_k`` layers within budget (completion by the highest free layers, which are cheapest
  because they do not lower the lowest trained block), so every client ends with exactly ``n_k`` layers.
  Patterns: ``triangle``, ``inverted-triangle``, ``bottleneck``, ``uniform``; append ``:input`` to mirror.
* ``fedra``: FedRA's random layer subset, seeded per client (uniform preference order, same fitting rule).
* ``hetlora`` / ``flexlora``: every module at the largest rank choice that fits (HetLoRA, FlexLoRA).
* ``uniform-min``: every client gets the ``fedpilot`` plan of the smallest budget (the "bucket effect"
  baseline of homogeneous FedIT).
* ``full``: every module at its maximum rank, budget ignored.
* ``fk-adaptive`` (ours, not a paper's): the ``fedpilot`` knapsack over modules *and* ranks (every module may
  take any rank choice, default powers of two up to the maximum), with importance that follows training: the
  caller re-plans with IG-score values (`solvers.importance.ig_score`) whenever the aggregated update norms move
  the importance (`StrategyTraits.adaptive`; `fedkernels.federated.planning.Planner` does it).

``min_coverage`` (knapsack strategies only, ``fedpilot`` and ``fk-adaptive``; our addition, 0 = off): a module is
kept only if at least that share of the clients (by count) can train it: the clients at least as rich as the
poorest client whose plan holds it. The knapsacks are solved, modules below the floor lose their value, the
knapsacks are re-solved and value-0 modules dropped from the plans, until the kept set is stable (a floor of 1
keeps what the poorest client trains). Why: a low layer only the richest tier can afford is averaged over few
clients, so under non-IID data it follows those clients' labels (the drift the bucket-effect baseline avoids by
training only what everyone can); the floor trades that coverage against the extra modules. Removing modules
never raises a plan's peak.

When a client cannot afford one whole layer (layer strategies) or all modules at the smallest rank
(hetlora/flexlora), it trains the modules of the top layer(s) that fit: our adaptation so that every budget
above `MemoryModel.min_trainable_bytes` trains something. A budget below that raises
`InfeasibleBudgetError` naming the client, its budget and the minimum.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from solvers.api import solve_many
from solvers.errors import InfeasibleBudgetError, ProblemError
from solvers.importance import PATTERNS, fim_pattern, geometric_pattern, layer_scores
from solvers.memory_model import MemoryModel
from solvers.problem import Plan, PlanStatus

__all__ = ["available_strategies", "plan_clients", "parse_strategy", "StrategyTraits", "strategy_traits", "TRAITS"]


@dataclass(frozen=True)
class StrategyTraits:
    """What an allocation strategy needs from its caller, declared once per strategy.

    ``randomised``: its plans are redrawn every round, seeded by the round (FedRA, Fed-HeLLo RGD); the
    others are solved once (Fed-HeLLo FIM draws once, from the importance known at the start).
    ``needs_importance``: it uses module importance scores (Fed-pilot's knapsack values, Fed-HeLLo FIM's
    clusters), which the caller must compute.
    ``ranks``: it allocates ranks rather than modules (HetLoRA/FlexLoRA-style): its cheapest plan is
    one module at the smallest rank choice. ``budgeted``: its plans fit the budgets (all but ``full``).
    ``adaptive``: its plans are re-solved during the run from importance that follows training (IG-score of
    the local Fisher mass and the aggregated update norms), when that importance changes.
    ``knapsack``: its plans are the memory model's knapsack solved per client, so a coverage floor
    (``min_coverage``) applies to it.
    """

    randomised: bool = False
    needs_importance: bool = False
    ranks: bool = False
    budgeted: bool = True
    adaptive: bool = False
    knapsack: bool = False


# base strategy name -> its traits (the registry `parse_strategy` validates against)
TRAITS: dict[str, StrategyTraits] = {
    "fedpilot": StrategyTraits(needs_importance=True, knapsack=True),
    "fedhello-fim": StrategyTraits(needs_importance=True),
    "fedhello-gd": StrategyTraits(),
    "fedhello-rgd": StrategyTraits(randomised=True),
    "fedra": StrategyTraits(randomised=True),
    "hetlora": StrategyTraits(ranks=True),
    "flexlora": StrategyTraits(ranks=True),
    "uniform-min": StrategyTraits(),
    "full": StrategyTraits(budgeted=False),
    "fk-adaptive": StrategyTraits(needs_importance=True, ranks=True, adaptive=True, knapsack=True),
}
_PATTERNED = ("fedhello-gd", "fedhello-rgd")
_SIMPLE = tuple(n for n in TRAITS if n not in _PATTERNED)


def strategy_traits(strategy: str) -> StrategyTraits:
    """Traits of ``strategy`` (full name, e.g. ``fedhello-rgd:triangle``); ProblemError for an unknown one."""
    return TRAITS[parse_strategy(strategy)[0]]


def available_strategies() -> list[str]:
    """Every strategy name (layer-pattern strategies once per pattern)."""
    return [*_SIMPLE, *(f"fedhello-gd:{p}" for p in PATTERNS), *(f"fedhello-rgd:{p}" for p in PATTERNS)]


def parse_strategy(strategy: str) -> tuple[str, str | None, str]:
    """``(base, pattern, orientation)``; ProblemError (a ValueError) listing the valid names for an unknown one."""
    s = str(strategy).strip().lower()
    base, _, rest = s.partition(":")
    if base in _SIMPLE and not rest:
        return base, None, "output"
    if base in _PATTERNED:
        pattern, _, orient = (rest or "bottleneck").partition(":")
        if pattern in PATTERNS and orient in ("", "output", "input"):
            return base, pattern, orient or "output"
    raise ProblemError(f"unknown strategy {strategy!r}; valid: {', '.join(available_strategies())} "
                     "(pattern strategies accept a ':input' suffix)")


def _rng(seed: int, client: object) -> np.random.Generator:
    key = client if isinstance(client, int) else zlib.crc32(str(client).encode())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(key) & 0xFFFFFFFF])


class _Ctx:
    def __init__(self, memory: MemoryModel, importance: Mapping[str, float] | None) -> None:
        self.memory = memory
        self.L = memory.num_blocks
        self.by_block: dict[int, list[str]] = {}
        for sp in memory.modules:
            self.by_block.setdefault(sp.block, []).append(sp.name)
        self.layers = sorted(self.by_block)
        vals = {sp.name: 1.0 for sp in memory.modules}
        if importance:
            given = {memory.spec(str(k)).name: float(v) for k, v in importance.items()}
            if sum(given.values()) > 0:
                vals = {n: given.get(n, 0.0) for n in vals}
        self.values = vals

    def layer_modules(self, layers, rank: int | None = None) -> dict[str, int]:
        return {n: (self.memory.spec(n).max_rank if rank is None else min(rank, self.memory.spec(n).max_rank))
                for l in layers for n in self.by_block.get(l, [])}

    def fits(self, plan: Mapping[str, int], budget: int) -> bool:
        return self.memory.predict(plan) <= budget

    def affordable_layers(self, budget: int, rank: int | None = None) -> int:
        """Most layers n whose cheapest placement (the top n layers) fits."""
        n = 0
        for k in range(1, len(self.layers) + 1):
            if self.fits(self.layer_modules(self.layers[-k:], rank), budget):
                n = k
            else:
                break
        return n

    def partial_top(self, budget: int, rank: int | None = None) -> dict[str, int]:
        """Modules of the top layer, cheapest first, while they fit (a client below one whole layer)."""
        top = self.layers[-1]
        names = sorted(self.by_block[top], key=lambda n: (self.memory.module_cost(n), n))
        plan: dict[str, int] = {}
        for n in names:
            r = self.memory.spec(n).max_rank if rank is None else min(rank, self.memory.spec(n).max_rank)
            if self.fits({**plan, n: r}, budget):
                plan[n] = r
        if not plan:  # the cheapest single module anywhere (min_trainable_bytes guarantees one fits)
            r0 = {sp.name: min(rank or sp.max_rank, sp.max_rank) for sp in self.memory.modules}
            best = min(r0, key=lambda n: (self.memory.predict({n: r0[n]}), n))
            if self.fits({best: r0[best]}, budget):
                plan[best] = r0[best]
        return plan

    def choose_layers(self, order: Sequence[int], n: int, budget: int) -> list[int]:
        """Take layers in preference ``order`` while the set stays completable to n layers within budget."""
        chosen: list[int] = []
        for l in order:
            if len(chosen) == n:
                break
            cand = [*chosen, l]
            rest = [x for x in reversed(self.layers) if x not in cand][: n - len(cand)]
            if self.fits(self.layer_modules(cand + rest), budget):
                chosen = cand
        return sorted(chosen)


def _plan(ctx: _Ctx, modules: Mapping[str, int], budget: int, client, backend: str, t0: float,
          status: PlanStatus = PlanStatus.FEASIBLE, message: str = "") -> Plan:
    blocks = [ctx.memory.spec(n).block for n in modules]
    return Plan(modules=dict(modules), status=status,
                objective=float(sum(ctx.values.get(n, 0.0) for n in modules)),
                predicted_bytes=ctx.memory.predict(modules), budget=int(budget), backend=backend,
                solve_time_s=time.perf_counter() - t0, client=client,
                lowest_block=min(blocks) if blocks else None, message=message)


def _knapsack(ctx: _Ctx, budgets: Mapping, rank_choices, backend: str, time_limit) -> dict:
    probs = [ctx.memory.problem(int(b), values=ctx.values, rank_choices=rank_choices, client=c)
             for c, b in budgets.items()]
    plans = solve_many(probs, backend, time_limit=time_limit)
    out = {}
    for prob, plan in zip(probs, plans, strict=True):
        if plan.status is PlanStatus.INFEASIBLE:
            raise InfeasibleBudgetError(prob.client, prob.budget, prob.min_train_bytes())
        _fill(ctx, prob, plan)
        out[prob.client] = plan
    return out


def _coverage(plans: Mapping, budgets: Mapping) -> dict[str, float]:
    """Module -> share of the clients that can train it: every client at least as rich as the poorest client whose
    plan holds it (a larger budget fits any plan a smaller one fits, `MemoryModel.predict` being one function of
    the plan). Counting only the clients whose *plans* hold a module would miss that the knapsack's optima are not
    nested: SmolLM2's middle tier trades the top layers the poorest tier trains for more valuable middle ones."""
    poorest: dict[str, int] = {}
    for c, p in plans.items():
        for n in p.modules:
            poorest[n] = min(poorest.get(n, budgets[c]), budgets[c])
    n_clients = len(budgets)
    return {n: sum(b >= lo for b in budgets.values()) / n_clients for n, lo in poorest.items()}


def _covered_knapsack(ctx: _Ctx, budgets: Mapping, rank_choices, backend: str, time_limit,
                      min_coverage: float) -> dict:
    """`_knapsack` restricted to modules that at least ``min_coverage`` of the clients can train (`_coverage`).

    Modules below the floor lose their value and the knapsacks are re-solved, until the kept set is stable; it
    only shrinks, so this ends after at most one re-solve per module. The poorest client's modules always have
    coverage 1, so the kept set is never empty and every client can afford some of it (a richer client fits the
    poorest one's plan); a floor of 1 keeps exactly what the poorest client trains, at each client's best ranks.
    """
    plans = _knapsack(ctx, budgets, rank_choices, backend, time_limit)
    if min_coverage <= 0:
        return plans
    base_values = dict(ctx.values)
    allowed = set(base_values)
    try:
        while True:
            cover = _coverage(plans, budgets)
            keep = {n for n in allowed if cover.get(n, 0.0) >= min_coverage - 1e-12}
            if keep == allowed:
                break
            allowed = keep
            ctx.values = {n: (v if n in allowed else 0.0) for n, v in base_values.items()}
            plans = _knapsack(ctx, budgets, rank_choices, backend, time_limit)
            for p in plans.values():  # value-0 modules a knapsack took on a tie are dropped (never raises the peak)
                p.modules = {n: r for n, r in p.modules.items() if n in allowed}
        for c, p in plans.items():
            if not p.modules:  # cannot happen by the argument above; a clear error rather than an idle client
                raise ProblemError(f"coverage floor {min_coverage:g}: client {c!r} can train none of the "
                                   f"{len(allowed)} kept modules")
            p.objective = float(sum(base_values.get(n, 0.0) for n in p.modules))
            p.predicted_bytes = ctx.memory.predict(p.modules)
            p.lowest_block = min(ctx.memory.spec(n).block for n in p.modules)
            note = f"coverage floor {min_coverage:g}: {len(allowed)} of {len(base_values)} modules kept"
            p.message = (p.message + "; " if p.message else "") + note
    finally:
        ctx.values = base_values
    return plans


def _fill(ctx: _Ctx, prob, plan: Plan) -> None:
    """Add modules the knapsack left out but that fit under `MemoryModel.predict`.

    The problem's additive costs count a shared input once per module (q and v read the same tensor),
    so its optimum can leave memory unused that `predict` knows is free. Modules are added by value, each
    at the largest rank option that still fits; the plan's status is kept, the message says what changed.
    """
    added = []
    for it in sorted(prob.items, key=lambda it: (-max(it.values), it.block, it.name)):
        if it.name in plan.modules or max(it.values) <= 0:
            continue
        for r in reversed(it.ranks):
            if ctx.fits({**plan.modules, it.name: r}, prob.budget):
                plan.modules[it.name] = r
                added.append(it.name)
                break
    if added:
        plan.objective = float(sum(prob.item(n).value_of(r) for n, r in plan.modules.items()))
        plan.lowest_block = min(prob.item(n).block for n in plan.modules)
        plan.message = (plan.message + "; " if plan.message else "") + (
            f"{len(added)} module(s) added that fit once shared inputs are counted once")
    plan.predicted_bytes = ctx.memory.predict(plan.modules)


def plan_clients(
    strategy: str,
    memory: MemoryModel,
    budgets: Mapping[int, int],
    *,
    seed: int = 0,
    importance: Mapping[str, float] | None = None,
    rank_choices: Sequence[int] | None = None,
    backend: str = "dp",
    time_limit: float | None = None,
    min_coverage: float = 0.0,
) -> dict[int, Plan]:
    """One plan per client (``budgets``: client id -> bytes) under ``strategy`` (see the module docstring).

    Every plan except ``full`` fits its budget under ``memory.predict``. Same seed, same plans.
    ``importance`` (module -> score) drives ``fedpilot``'s values and ``fedhello-fim``'s clusters;
    ``rank_choices`` the knapsack's rank options and the hetlora/flexlora ranks. ``min_coverage`` (in [0, 1],
    knapsack strategies only) keeps only modules that share of the clients trains (module docstring).

    Raises:
        ProblemError: unknown strategy (the message lists the valid ones); ``min_coverage`` outside [0, 1] or
            nonzero for a strategy that is not a knapsack.
        InfeasibleBudgetError: a client's budget is below the cheapest trainable plan.
    """
    base, pattern, orient = parse_strategy(strategy)
    if isinstance(min_coverage, bool) or not isinstance(min_coverage, int | float) or not 0 <= min_coverage <= 1:
        raise ProblemError(f"min_coverage must be a number in [0, 1], got {min_coverage!r}")
    if min_coverage and not TRAITS[base].knapsack:
        knapsacks = ", ".join(n for n, t in TRAITS.items() if t.knapsack)
        raise ProblemError(f"min_coverage applies to the knapsack strategies ({knapsacks}), "
                           f"not {strategy!r}; got {min_coverage!r}")
    if not isinstance(memory, MemoryModel):
        raise ProblemError(f"plan_clients needs a solvers.memory_model.MemoryModel, got {type(memory).__name__}")
    ctx = _Ctx(memory, importance)
    budgets = {c: int(b) for c, b in budgets.items()}
    if not budgets:
        return {}
    if not TRAITS[base].budgeted:
        t0 = time.perf_counter()
        return {c: _plan(ctx, memory.full_plan(), b, c, "full", t0, message="budget ignored")
                for c, b in budgets.items()}
    if rank_choices is not None:
        rank_choices = sorted({int(r) for r in rank_choices})
        if not rank_choices or rank_choices[0] < 1:
            raise ProblemError(f"rank_choices must be ints >= 1, got {rank_choices!r}")
    ranked = TRAITS[base].ranks
    need = memory.min_trainable_bytes(rank_choices or (memory.default_rank_choices() if ranked else None))
    for c, b in sorted(budgets.items(), key=lambda kv: str(kv[0])):
        if b < need:
            raise InfeasibleBudgetError(c, b, need)

    if base == "fedpilot":
        return _covered_knapsack(ctx, budgets, rank_choices, backend, time_limit, min_coverage)
    if base == "fk-adaptive":  # modules x ranks: one multiple-choice knapsack item per module
        return _covered_knapsack(ctx, budgets, rank_choices or memory.default_rank_choices(), backend,
                                 time_limit, min_coverage)
    if base == "uniform-min":
        low = min(budgets, key=lambda c: (budgets[c], str(c)))
        ref = _knapsack(ctx, {low: budgets[low]}, rank_choices, backend, time_limit)[low]
        out = {}
        for c, b in budgets.items():
            t0 = time.perf_counter()
            out[c] = _plan(ctx, ref.modules, b, c, f"uniform-min/{ref.backend}", t0, status=ref.status,
                           message=f"plan of client {low} (smallest budget)")
        return out
    if TRAITS[base].ranks:
        return {c: _rank_plan(ctx, base, b, c, rank_choices) for c, b in budgets.items()}

    out = {}
    k = 0
    for c, b in budgets.items():
        t0 = time.perf_counter()
        n = ctx.affordable_layers(b)
        if n == 0:
            out[c] = _plan(ctx, ctx.partial_top(b), b, c, strategy, t0,
                           message="budget below one whole layer: part of the top layer")
            k += 1
            continue
        L = len(ctx.layers)
        if base == "fedra":
            order = [ctx.layers[i] for i in _rng(seed, c).permutation(L)]
        elif base == "fedhello-gd":
            w = geometric_pattern(L, pattern, orient)
            order = _gd_order(w, k)
            order = [ctx.layers[i] for i in order]
        else:  # rgd / fim: weighted draw without replacement
            if TRAITS[base].needs_importance and importance:
                w = fim_pattern(layer_scores(ctx.values, memory.blocks, memory.num_blocks))
                w = np.array([w[l] for l in ctx.layers], dtype=float)
                w = w / w.sum()
            else:
                w = geometric_pattern(L, pattern or "bottleneck", orient)
            order = [ctx.layers[i] for i in _rng(seed, c).choice(L, size=L, replace=False, p=w)]
        layers = ctx.choose_layers(order, n, b)
        out[c] = _plan(ctx, ctx.layer_modules(layers), b, c, strategy, t0, message=f"{n} layers: {layers}")
        k += 1
    return out


def _gd_order(w: np.ndarray, k: int) -> list[int]:
    """Layers by decreasing pattern weight; each group of equal weights rotated by the client's index k."""
    out: list[int] = []
    for val in sorted(set(np.round(w, 12).tolist()), reverse=True):
        group = [i for i in range(len(w)) if round(float(w[i]), 12) == val]
        s = k % len(group)
        out += group[s:] + group[:s]
    return out


def _rank_plan(ctx: _Ctx, base: str, budget: int, client, rank_choices) -> Plan:
    """The rank strategies' best documented configuration under the memory model (issue 15, item 2).

    1. Every module at the largest rank choice that fits (HetLoRA's and FlexLoRA's own setting: a client's
       rank on all modules).
    2. A client that cannot afford every module even at the smallest rank: the modules are chosen first,
       at the cheapest placement (the top ``n`` layers that fit at the smallest rank, or part of the top
       layer), then their rank is raised to the largest choice at which they still fit, then modules of the
       top layer left out are added at that rank while they fit. Rank costs almost no activation memory
       (``b*s*r`` per module against ``b*s*d`` for the pass-through), so a client that affords a few top
       layers at rank 1 usually affords them at the full rank: training them at rank 1 would handicap the
       baseline for nothing.
    """
    t0 = time.perf_counter()
    choices = rank_choices or list(ctx.memory.default_rank_choices())
    choices = sorted({min(int(r), ctx.memory.max_rank) for r in choices})
    for r in reversed(choices):
        plan = ctx.layer_modules(ctx.layers, r)
        if ctx.fits(plan, budget):
            return _plan(ctx, plan, budget, client, base, t0, message=f"rank {r} on every module")
    r0 = choices[0]
    n = ctx.affordable_layers(budget, r0)
    names = list(ctx.layer_modules(ctx.layers[-n:], r0)) if n else list(ctx.partial_top(budget, r0))
    rank = next(r for r in reversed(choices) if r == r0 or ctx.fits({m: r for m in names}, budget))
    plan = {m: min(rank, ctx.memory.spec(m).max_rank) for m in names}
    added = 0
    for m in sorted(ctx.by_block[ctx.layers[-1]], key=lambda m: (ctx.memory.module_cost(m), m)):
        r = min(rank, ctx.memory.spec(m).max_rank)
        if m not in plan and ctx.fits({**plan, m: r}, budget):
            plan[m] = r
            added += 1
    where = f"the top {n} layers" if n else "part of the top layer"
    return _plan(ctx, plan, budget, client, base, t0,
                 message=f"rank {rank} on {where} only" + (f" (+{added} top-layer modules)" if added else ""))
