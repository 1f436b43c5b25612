"""Solver backends. Each module exposes ``is_available(**kw)``, ``unavailable_reason(**kw)`` and
``solve_batch(problems, *, time_limit, name, **kw) -> list[Plan]`` (problems already checked to admit a module);
`solvers.api` maps backend names to them."""
