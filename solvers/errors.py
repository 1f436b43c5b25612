"""Typed exceptions of `solvers`.

`solvers` never imports `fedkernels` (it must plan without torch or a GPU), so it has its own hierarchy.
Every message names the client, the module or the offending value so a user can act on the first line.
`ValueError` subclasses are used where a caller would naturally catch `ValueError` (bad input).
"""

from __future__ import annotations


class SolversError(Exception):
    """Base class of every error raised on purpose by `solvers`."""


class ProblemError(SolversError, ValueError):
    """A malformed allocation problem or plan request (unknown module, negative cost, bad backend...).

    The message quotes the offending value.
    """


class BudgetParseError(SolversError, ValueError):
    """A memory amount such as ``"6GiB"`` that could not be parsed (the message quotes the text)."""


def _human(n: int) -> str:
    # Local import: units imports errors, so importing units at module level would be circular.
    from solvers.units import format_bytes

    return format_bytes(n)


class InfeasibleBudgetError(SolversError):
    """A client's budget is below the cheapest plan that trains at least one LoRA module.

    Attributes:
        client: the client id (or None when the problem was not tied to a client).
        budget: the client's budget in bytes.
        min_bytes: the smallest peak memory of a plan that trains any module, in bytes.
    """

    def __init__(self, client: object, budget: int, min_bytes: int, message: str | None = None):
        self.client = client
        self.budget = int(budget)
        self.min_bytes = int(min_bytes)
        who = f"client {client}" if client is not None else "problem"
        text = (
            f"{who}: budget {_human(self.budget)} is below the minimum {_human(self.min_bytes)} "
            "needed to train any LoRA module"
        )
        if message:
            text = f"{text} ({message})"
        super().__init__(text)

    def __reduce__(self):  # keep the keyword-style constructor picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.client, self.budget, self.min_bytes))


class SolverError(SolversError):
    """A solver backend failed (crashed, returned garbage, reported an error status).

    Distinct from an infeasible budget (a property of the problem, reported as a plan status or
    `InfeasibleBudgetError`) and from a timeout (a plan with status ``timeout``).

    Attributes:
        backend: name of the backend that failed.
        reason: what went wrong, in words.
    """

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        self.reason = reason
        super().__init__(f"solver backend {backend!r} failed: {reason}")

    def __reduce__(self):
        return (type(self), (self.backend, self.reason))


class BackendUnavailableError(SolverError):
    """A backend whose library (or native extension) is not installed on this machine."""


def os_error_naming(exc: OSError, path: object) -> OSError:
    """``exc`` itself when it names a file, else an OSError of the same errno naming ``path``.

    A write that fails mid-way (a full disk: ENOSPC) raises an OSError with no file name, so a one-line report
    would read "No space left on device" without saying where; callers re-raise this one instead.
    """
    if exc.filename is not None:
        return exc
    new = OSError(exc.errno, exc.strerror or str(exc), str(path))
    new.__cause__ = exc
    return new
