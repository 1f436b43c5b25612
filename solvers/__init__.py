"""Memory-aware LoRA allocation for federated clients (standalone: no torch, no GPU needed).

`AllocationProblem` describes which LoRA modules a client could train, their per-rank costs and values, the
non-additive activation cost of the lowest trainable block, and the client's budget; `solve` returns a `Plan`.
See ../shared/docs/algorithms.md sec. 1-2 for the formulation (Fed-pilot, Fed-HeLLo).
"""

from solvers.api import (
    EXACT_BACKENDS,
    available_backends,
    backend_names,
    check_feasible,
    infeasible_plan,
    solve,
    solve_many,
)
from solvers.errors import (
    BackendUnavailableError,
    BudgetParseError,
    InfeasibleBudgetError,
    ProblemError,
    SolverError,
    SolversError,
)
from solvers.problem import AllocationProblem, Item, Plan, PlanStatus
from solvers.units import format_bytes, parse_bytes

__all__ = [
    "EXACT_BACKENDS",
    "AllocationProblem",
    "BackendUnavailableError",
    "BudgetParseError",
    "InfeasibleBudgetError",
    "Item",
    "Plan",
    "PlanStatus",
    "ProblemError",
    "SolverError",
    "SolversError",
    "available_backends",
    "backend_names",
    "check_feasible",
    "format_bytes",
    "infeasible_plan",
    "parse_bytes",
    "solve",
    "solve_many",
]
