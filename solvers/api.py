"""Front door of the allocation solvers: `solve`, `solve_many`, `available_backends`.

Every backend module in `solvers.backends` exposes ``solve_batch(problems, time_limit) -> list[Plan]`` for
problems whose budget admits at least one trainable module; this front end handles the rest uniformly:
infeasible budgets become plans with status ``infeasible`` (empty modules), unknown backends a
`ProblemError` listing the valid names, and every returned plan is re-checked against the exact costs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Sequence

from solvers.errors import BackendUnavailableError, InfeasibleBudgetError, ProblemError, SolverError
from solvers.problem import AllocationProblem, Plan, PlanStatus
from solvers.units import format_bytes

# name -> (module, keyword arguments of its solve_batch). "dp" picks the native extension when it is built.
_BACKENDS: dict[str, tuple[str, dict]] = {
    "dp": ("solvers.backends.dp", {"impl": "auto"}),
    "dp-native": ("solvers.backends.dp", {"impl": "native"}),
    "dp-numpy": ("solvers.backends.dp", {"impl": "numpy"}),
    "greedy": ("solvers.backends.greedy", {}),
    "pulp": ("solvers.backends.ilp", {"engine": "pulp-cbc"}),
    "pulp-cbc": ("solvers.backends.ilp", {"engine": "pulp-cbc"}),
    "pulp-highs": ("solvers.backends.ilp", {"engine": "pulp-highs"}),
    "cvxpy": ("solvers.backends.ilp", {"engine": "cvxpy-highs"}),
}

#: Backends that prove optimality (up to the DP's memory grid, reported through the plan status).
EXACT_BACKENDS: tuple[str, ...] = ("dp", "dp-native", "dp-numpy", "pulp", "pulp-cbc", "pulp-highs", "cvxpy")


def backend_names() -> list[str]:
    """Every backend name this version knows (installed or not)."""
    return list(_BACKENDS)


def _module_for(backend: str):
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ProblemError(f"unknown solver backend {backend!r}; valid backends: {', '.join(_BACKENDS)}")
    modname, kwargs = _BACKENDS[backend]
    return importlib.import_module(modname), kwargs


def available_backends() -> list[str]:
    """Backends usable on this machine (library importable, native extension built)."""
    out = []
    for name in _BACKENDS:
        try:
            mod, kwargs = _module_for(name)
            if mod.is_available(**kwargs):
                out.append(name)
        except ImportError:
            continue
    return out


def infeasible_plan(problem: AllocationProblem, backend: str, solve_time_s: float = 0.0) -> Plan:
    """The plan returned when the budget cannot train any module."""
    need = problem.min_train_bytes()
    return Plan(
        modules={},
        status=PlanStatus.INFEASIBLE,
        objective=0.0,
        predicted_bytes=problem.fixed_bytes,
        budget=problem.budget,
        backend=backend,
        solve_time_s=solve_time_s,
        client=problem.client,
        lowest_block=None,
        message=(
            f"budget {format_bytes(problem.budget)} is below the minimum {format_bytes(need)} "
            "needed to train any LoRA module"
        ),
    )


def check_feasible(problem: AllocationProblem) -> None:
    """Raise `InfeasibleBudgetError` (client, budget, minimum) when no module can be trained."""
    if problem.items and problem.budget < problem.min_train_bytes():
        raise InfeasibleBudgetError(problem.client, problem.budget, problem.min_train_bytes())


def _verify(problem: AllocationProblem, plan: Plan) -> Plan:
    """Recompute cost/value exactly; a plan over budget is a backend bug, reported as SolverError."""
    plan.modules = {n: int(r) for n, r in plan.modules.items() if r}
    exact, value, lowest = problem.evaluate(plan.modules)
    if exact > problem.budget and plan.status is not PlanStatus.INFEASIBLE:
        raise SolverError(
            plan.backend,
            f"client {problem.client}: plan needs {exact} bytes > budget {problem.budget} bytes under exact costs",
        )
    plan.predicted_bytes = exact
    plan.objective = value
    plan.lowest_block = lowest
    plan.client = problem.client
    plan.budget = problem.budget
    if plan.status is PlanStatus.OPTIMAL:
        plan.bound = plan.objective
    return plan


def solve_many(
    problems: Iterable[AllocationProblem], backend: str = "dp", *, time_limit: float | None = None
) -> list[Plan]:
    """Solve many problems (typically one per client); plans come back in input order.

    The DP backends share one table across problems with identical items and block costs, so 1,000 clients of
    one model cost little more than one. ``time_limit`` (seconds) applies to each problem for the ILP backends.
    Budgets below `AllocationProblem.min_train_bytes` give status ``infeasible`` plans (no exception).
    """
    mod, kwargs = _module_for(backend)
    probs: Sequence[AllocationProblem] = list(problems)
    for p in probs:
        if not isinstance(p, AllocationProblem):
            raise ProblemError(f"expected AllocationProblem, got {type(p).__name__}: {p!r:.80}")
    if time_limit is not None and not time_limit > 0:
        raise ProblemError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    if not mod.is_available(**kwargs):
        raise BackendUnavailableError(backend, mod.unavailable_reason(**kwargs))
    plans: list[Plan | None] = [None] * len(probs)
    todo: list[int] = []
    for k, p in enumerate(probs):
        if p.items and p.budget < p.min_train_bytes():
            plans[k] = infeasible_plan(p, backend)
        elif not p.items:
            status = PlanStatus.OPTIMAL if p.budget >= p.fixed_bytes else PlanStatus.INFEASIBLE
            plans[k] = Plan({}, status, 0.0, p.fixed_bytes, p.budget, backend, 0.0, p.client, None, "no modules")
        else:
            todo.append(k)
    if todo:
        t0 = time.perf_counter()
        solved = mod.solve_batch([probs[k] for k in todo], time_limit=time_limit, name=backend, **kwargs)
        elapsed = time.perf_counter() - t0
        for k, plan in zip(todo, solved, strict=True):
            if plan.solve_time_s <= 0:
                plan.solve_time_s = elapsed / len(todo)
            plans[k] = _verify(probs[k], plan)
    return [p for p in plans if p is not None]


def solve(problem: AllocationProblem, backend: str = "dp", *, time_limit: float | None = None) -> Plan:
    """Solve one allocation problem with ``backend`` (see `available_backends`)."""
    return solve_many([problem], backend, time_limit=time_limit)[0]
