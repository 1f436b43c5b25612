"""ILP backends: the (x, z) formulation of ../shared/docs/algorithms.md sec. 1b, solved by CBC or HiGHS.

    max  sum_{i,o} v_io x_io
    s.t. sum_o x_io <= 1                                  (one rank option per module; none = rank 0)
         z_{block(i)} >= sum_o x_io                        (a trained module makes its block keep activations)
         z_j <= z_{j+1}                                    (gradients flow through every block above it)
         sum c_io x_io + sum_j a_j z_j <= budget - M_static - M_head
         x, z binary

``z_{block(i)} >= x_i`` plus monotone ``z`` is equivalent to ``z_j >= x_i`` for all ``j >= block(i)`` with far
fewer rows. Engines: ``pulp-cbc`` (pulp's bundled CBC), ``pulp-highs`` (pulp's highspy interface) and
``cvxpy-highs`` (cvxpy with HiGHS). Byte coefficients are scaled to MiB-sized units for conditioning; a returned
plan is re-checked in exact integer bytes and, if the solver's feasibility tolerance let it exceed the budget,
the capacity row is tightened by the excess and the model re-solved.

Time limits: the remaining time (after building the model) goes to the solver; a solver stopped by its limit
gives status ``timeout`` with its best incumbent (or an empty plan when it had none). Any other failure is a
`SolverError` naming the engine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np

from solvers.errors import SolverError
from solvers.problem import AllocationProblem, Plan, PlanStatus

_ENGINES = ("pulp-cbc", "pulp-highs", "cvxpy-highs")
_MAX_TIGHTEN = 3
# Relative MIP gap: the engines' defaults (HiGHS 1e-4) would let "optimal" plans fall short of the optimum.
_GAP = 1e-9


def is_available(engine: str = "pulp-cbc") -> bool:
    try:
        if engine.startswith("pulp"):
            import pulp

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(msg=False) if engine == "pulp-cbc" else pulp.HiGHS(msg=False)
            return bool(solver.available())
        import cvxpy as cp

        return "HIGHS" in cp.installed_solvers()
    except Exception:  # noqa: BLE001 - any import/probe failure means "not available"
        return False


def unavailable_reason(engine: str = "pulp-cbc") -> str:
    lib = (
        "pulp (with CBC)"
        if engine == "pulp-cbc"
        else ("pulp + highspy" if engine == "pulp-highs" else "cvxpy + highspy")
    )
    return f"{engine} needs {lib} installed"


class _Model:
    """Flattened option list of one problem (only valid options)."""

    def __init__(self, problem: AllocationProblem):
        self.problem = problem
        self.opt_item: list[int] = []
        self.opt_rank: list[int] = []
        cost, value = [], []
        for i, it in enumerate(problem.items):
            for r, c, v in zip(it.ranks, it.costs, it.values, strict=True):
                self.opt_item.append(i)
                self.opt_rank.append(r)
                cost.append(c)
                value.append(v)
        self.cost = np.array(cost, dtype=np.float64)
        self.value = np.array(value, dtype=np.float64)
        self.block_costs = np.array(problem.block_costs, dtype=np.float64)
        self.capacity = problem.budget - problem.fixed_bytes
        # Scale bytes so the capacity row has O(1e3) magnitudes (1 MiB units for GiB budgets).
        self.unit = float(max(1, self.capacity // 4096))

    def plan_from(self, xval: np.ndarray) -> dict[str, int]:
        modules: dict[str, int] = {}
        for k in np.nonzero(np.asarray(xval) > 0.5)[0]:
            it = self.problem.items[self.opt_item[k]]
            modules[it.name] = self.opt_rank[k]
        return modules


def _solve_pulp(model: _Model, capacity: float, engine: str, time_left: float | None):
    import pulp

    p = model.problem
    lp = pulp.LpProblem("lora_allocation", pulp.LpMaximize)
    if hasattr(lp, "add_variable"):  # pulp >= 3.3 (LpVariable(...) is deprecated there)

        def var(name):
            return lp.add_variable(name, cat="Binary")
    else:  # pragma: no cover - older pulp

        def var(name):
            return pulp.LpVariable(name, cat="Binary")

    x = [var(f"x{k}") for k in range(len(model.cost))]
    z = [var(f"z{j}") for j in range(p.num_blocks)]
    lp += pulp.lpSum(float(model.value[k]) * x[k] for k in range(len(x)))
    per_item: dict[int, list] = {}
    for k, i in enumerate(model.opt_item):
        per_item.setdefault(i, []).append(x[k])
    for i, xs in per_item.items():
        lp += pulp.lpSum(xs) <= z[p.items[i].block]  # also implies sum <= 1 since z <= 1
        if len(xs) > 1:
            lp += pulp.lpSum(xs) <= 1
    for j in range(p.num_blocks - 1):
        lp += z[j] <= z[j + 1]
    lp += (
        pulp.lpSum(float(model.cost[k] / model.unit) * x[k] for k in range(len(x)))
        + pulp.lpSum(float(model.block_costs[j] / model.unit) * z[j] for j in range(p.num_blocks))
        <= capacity / model.unit
    )
    limit = None if time_left is None else max(0.05, time_left)
    if engine == "pulp-cbc":
        with warnings.catch_warnings():
            # pulp 3.3 deprecates the bundled CBC for 4.0; it is still the CBC every pulp install ships.
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, threads=1, gapRel=_GAP)
    else:
        solver = pulp.HiGHS(msg=False, timeLimit=limit, threads=1, gapRel=_GAP, output_flag=False)
    try:
        lp.solve(solver)
    except Exception as exc:  # noqa: BLE001 - pulp raises PulpSolverError and friends
        raise SolverError(engine, f"client {p.client}: {type(exc).__name__}: {exc}") from exc
    sol = lp.sol_status
    xval = np.array([v.varValue or 0.0 for v in x])
    if sol == pulp.LpSolutionOptimal:
        return "optimal", xval
    if sol == pulp.LpSolutionIntegerFeasible:
        return "incumbent", xval
    if sol == pulp.LpSolutionNoSolutionFound and time_left is not None:
        return "none", None
    raise SolverError(
        engine, f"client {p.client}: solver returned {pulp.LpStatus[lp.status]!r} / {pulp.LpSolution.get(sol, sol)!r}"
    )


def _solve_cvxpy(model: _Model, capacity: float, engine: str, time_left: float | None):
    import cvxpy as cp
    import scipy.sparse as sp

    p = model.problem
    n_opt, n_items, n_blocks = len(model.cost), len(p.items), p.num_blocks
    x = cp.Variable(n_opt, boolean=True)
    z = cp.Variable(n_blocks, boolean=True)
    sel = sp.csr_matrix((np.ones(n_opt), (model.opt_item, np.arange(n_opt))), shape=(n_items, n_opt))
    blk = sp.csr_matrix(
        (np.ones(n_items), (np.arange(n_items), [it.block for it in p.items])), shape=(n_items, n_blocks)
    )
    cons = [sel @ x <= blk @ z]
    if n_blocks > 1:
        cons.append(z[:-1] <= z[1:])
    cons.append((model.cost / model.unit) @ x + (model.block_costs / model.unit) @ z <= capacity / model.unit)
    prob = cp.Problem(cp.Maximize(model.value @ x), cons)
    opts: dict = {"mip_rel_gap": _GAP}
    if time_left is not None:
        opts["time_limit"] = max(0.05, time_left)
    try:
        with warnings.catch_warnings():
            # cvxpy warns "Solution may be inaccurate" when HiGHS stops on its time limit; reported as a timeout.
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver=cp.HIGHS, **opts)
    except cp.error.SolverError as exc:
        raise SolverError(engine, f"client {p.client}: {exc}") from exc
    if prob.status == cp.OPTIMAL:
        return "optimal", np.asarray(x.value)
    if prob.status == cp.USER_LIMIT:
        return ("incumbent", np.asarray(x.value)) if x.value is not None else ("none", None)
    raise SolverError(engine, f"client {p.client}: cvxpy status {prob.status!r}")


def _solve_one(problem: AllocationProblem, engine: str, name: str, time_limit: float | None) -> Plan:
    t0 = time.perf_counter()
    model = _Model(problem)
    capacity = float(model.capacity)
    run = _solve_pulp if engine.startswith("pulp") else _solve_cvxpy
    modules: dict[str, int] = {}
    status = PlanStatus.TIMEOUT
    message = ""
    for attempt in range(_MAX_TIGHTEN + 1):
        time_left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if time_left is not None and time_left <= 0:
            message = "time limit reached while re-solving"
            break
        kind, xval = run(model, capacity, engine, time_left)
        if kind == "none":
            modules, status, message = {}, PlanStatus.TIMEOUT, "time limit reached before any incumbent"
            break
        cand = model.plan_from(xval)
        excess = problem.cost(cand) - problem.budget
        if excess <= 0:
            modules = cand
            status = PlanStatus.OPTIMAL if kind == "optimal" else PlanStatus.TIMEOUT
            message = "" if kind == "optimal" else "time limit reached: best incumbent"
            if attempt:
                message = (message + f"; capacity tightened {attempt}x for solver tolerance").lstrip("; ")
            break
        # The solver's feasibility tolerance admitted a plan a few bytes over: tighten and retry.
        capacity -= excess + model.unit * 1e-6 * max(1.0, capacity / model.unit)
    else:
        raise SolverError(
            name, f"client {problem.client}: plans kept exceeding the budget after {_MAX_TIGHTEN} retries"
        )
    return Plan(modules, status, 0.0, 0, problem.budget, name, time.perf_counter() - t0, problem.client, None, message)


def solve_batch(
    problems: Sequence[AllocationProblem],
    *,
    time_limit: float | None = None,
    name: str = "pulp",
    engine: str = "pulp-cbc",
) -> list[Plan]:
    """One ILP per problem; ``time_limit`` (seconds) applies to each problem separately."""
    if engine not in _ENGINES:
        raise SolverError(name, f"unknown ILP engine {engine!r}; valid: {', '.join(_ENGINES)}")
    return [_solve_one(p, engine, name, time_limit) for p in problems]
