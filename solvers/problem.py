"""The allocation problem (which LoRA modules, at which rank, fit a client's memory) and its solution.

Memory model (../shared/docs/algorithms.md sec. 1b, Fed-pilot arXiv 2410.10200 as interpreted there):

    Mem(X) = M_static + sum_{i in X} c_i(r_i) + sum_{j >= lmin(X)} a_j + M_head

``c_i(r)`` is the additive cost of training module ``i`` at rank ``r`` (params' grads, optimizer states, the
module's own saved tensors); ``a_j`` the activations block ``j`` must keep so gradients can flow *through* it,
paid for every block at or above the lowest trainable block ``lmin(X)``; blocks below keep nothing. The
activation term makes the cost non-additive: a module in block 0 drags in every ``a_j``.

Each module is an `Item` with a few rank options (multiple-choice knapsack): rank 0 (not trained) is implicit
and costs nothing. `AllocationProblem` is a frozen, hashable value so many clients sharing the same model can be
batched by the DP backend (`solvers.solve_many`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from solvers.errors import ProblemError


class PlanStatus(StrEnum):
    """Outcome of a solve: proven optimal, feasible (no optimality proof), infeasible, or time limit hit."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    TIMEOUT = "timeout"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Item:
    """One LoRA module that may be trained.

    Attributes:
        name: unique module name, e.g. ``"model.layers.3.self_attn.q_proj"``.
        block: transformer block index, 0 = closest to the input.
        ranks: the rank options, all > 0 and strictly increasing (rank 0 = not trained is implicit).
        costs: additive bytes ``c_i(r)`` per rank option (>= 0).
        values: value (importance) per rank option (finite, >= 0).
    """

    name: str
    block: int
    ranks: tuple[int, ...]
    costs: tuple[int, ...]
    values: tuple[float, ...]
    _rank_index: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProblemError(f"item name must be a non-empty string, got {self.name!r}")
        if isinstance(self.block, numbers.Integral) and not isinstance(self.block, bool):
            object.__setattr__(self, "block", int(self.block))
        if not _is_int(self.block) or self.block < 0:
            raise ProblemError(f"item {self.name!r}: block must be an int >= 0, got {self.block!r}")
        for attr in ("ranks", "costs", "values"):
            raw = getattr(self, attr)
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
                raise ProblemError(f"item {self.name!r}: {attr} must be a sequence, got {raw!r}")
            object.__setattr__(self, attr, tuple(raw))
        if not self.ranks:
            raise ProblemError(f"item {self.name!r}: needs at least one rank option, got ranks={self.ranks!r}")
        if not (len(self.ranks) == len(self.costs) == len(self.values)):
            raise ProblemError(
                f"item {self.name!r}: ranks, costs and values must have the same length, got "
                f"ranks={self.ranks!r}, costs={self.costs!r}, values={self.values!r}"
            )
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
                raise ProblemError(f"item {self.name!r}: ranks must be ints > 0, got {r!r} in {self.ranks!r}")
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:], strict=False)):
            raise ProblemError(f"item {self.name!r}: ranks must be strictly increasing, got {self.ranks!r}")
        costs = []
        for c in self.costs:
            integral = isinstance(c, numbers.Integral) and not isinstance(c, bool)  # numpy ints too
            if integral or (isinstance(c, float) and c.is_integer()):
                c = int(c)
            else:
                raise ProblemError(f"item {self.name!r}: costs must be integer bytes, got {c!r}")
            if c < 0:
                raise ProblemError(f"item {self.name!r}: costs must be >= 0 bytes, got {c!r} in {self.costs!r}")
            costs.append(c)
        object.__setattr__(self, "costs", tuple(costs))
        values = []
        for v in self.values:
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise ProblemError(f"item {self.name!r}: values must be numbers, got {v!r}") from None
            if not math.isfinite(fv) or fv < 0:
                raise ProblemError(f"item {self.name!r}: values must be finite and >= 0, got {v!r}")
            values.append(fv)
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "_rank_index", {r: k for k, r in enumerate(self.ranks)})

    def option(self, rank: int) -> int:
        """Index of ``rank`` in `ranks`; raises ProblemError for a rank that is not an option."""
        try:
            return self._rank_index[rank]
        except (KeyError, TypeError):
            raise ProblemError(
                f"module {self.name!r}: rank {rank!r} is not one of its options {self.ranks!r}"
            ) from None

    def value_of(self, rank: int) -> float:
        """Value of training this module at ``rank`` (0.0 for rank 0)."""
        return 0.0 if rank == 0 else self.values[self.option(rank)]


@dataclass(frozen=True)
class AllocationProblem:
    """Choose a rank (or 0) per module to maximise total value with peak memory <= budget.

    Attributes:
        items: the LoRA modules (names unique).
        block_costs: ``a_j``, pass-through activation bytes kept by block ``j`` whenever the lowest trainable
            block is <= j; its length is the number of blocks.
        static_bytes: ``M_static`` (frozen weights, all adapters present, workspace), always paid.
        head_bytes: ``M_head`` (logits, loss buffers), always paid.
        budget: the client's peak-memory budget in bytes.
        client: optional client id, carried into plans and error messages.
        quantum: DP memory grid in bytes; None = automatic (see `solvers.backends.dp.auto_quantum`).
    """

    items: tuple[Item, ...]
    block_costs: tuple[int, ...]
    static_bytes: int
    head_bytes: int
    budget: int
    client: int | str | None = None
    quantum: int | None = None
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _suffix: tuple[int, ...] = field(init=False, repr=False, compare=False, hash=False)
    _min_extra: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        items = tuple(self.items)
        for it in items:
            if not isinstance(it, Item):
                raise ProblemError(f"problem items must be solvers.Item instances, got {it!r}")
        object.__setattr__(self, "items", items)
        blocks = []
        for a in self.block_costs:
            if isinstance(a, bool) or not isinstance(a, numbers.Integral):
                raise ProblemError(f"block_costs must be integer bytes, got {a!r}")
            if int(a) < 0:
                raise ProblemError(f"block_costs must be >= 0 bytes, got {a!r} in {tuple(self.block_costs)!r}")
            blocks.append(int(a))
        if not (isinstance(self.block_costs, tuple) and all(type(a) is int for a in self.block_costs)):
            object.__setattr__(self, "block_costs", tuple(blocks))  # else keep the object: batching keys on id()
        for attr in ("static_bytes", "head_bytes", "budget"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ProblemError(f"{attr} must be an integer number of bytes, got {v!r}")
            if v < 0:
                raise ProblemError(f"{attr} must be >= 0 bytes, got {v!r}")
            object.__setattr__(self, attr, int(v))
        if self.quantum is not None and (not _is_int(self.quantum) or self.quantum <= 0):
            raise ProblemError(f"quantum must be a positive int (bytes) or None, got {self.quantum!r}")
        index: dict[str, int] = {}
        for k, it in enumerate(items):
            if it.name in index:
                raise ProblemError(f"duplicate module name {it.name!r} in problem")
            if it.block >= len(blocks):
                raise ProblemError(
                    f"module {it.name!r}: block {it.block} is out of range for {len(blocks)} blocks (block_costs)"
                )
            index[it.name] = k
        object.__setattr__(self, "_index", index)
        suffix = [0] * (len(blocks) + 1)
        for j in range(len(blocks) - 1, -1, -1):
            suffix[j] = suffix[j + 1] + blocks[j]
        object.__setattr__(self, "_suffix", tuple(suffix))
        object.__setattr__(self, "_min_extra", min((min(it.costs) + suffix[it.block] for it in items), default=0))

    # --- structure -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of blocks (= ``len(block_costs)``)."""
        return len(self.block_costs)

    @property
    def fixed_bytes(self) -> int:
        """Bytes paid by every plan, trained or not: ``static_bytes + head_bytes``."""
        return self.static_bytes + self.head_bytes

    def item(self, name: str) -> Item:
        """The item called ``name``; ProblemError naming it if unknown."""
        try:
            return self.items[self._index[name]]
        except KeyError:
            raise ProblemError(f"unknown module {name!r} (problem has {len(self.items)} modules)") from None

    def activation_bytes(self, lowest_block: int | None) -> int:
        """``A(l) = sum_{j >= l} a_j`` for lowest trainable block ``l``; 0 when nothing trains (None)."""
        if lowest_block is None:
            return 0
        if not 0 <= lowest_block < self.num_blocks:
            raise ProblemError(f"block {lowest_block!r} is out of range for {self.num_blocks} blocks")
        return self._suffix[lowest_block]

    def evaluate(self, selection: Mapping[str, int]) -> tuple[int, float, int | None]:
        """``(cost, value, lowest_block)`` of a plan in one pass (see `cost`, `value`, `lowest_block`)."""
        if not isinstance(selection, Mapping):
            raise ProblemError(f"a selection maps module name -> rank, got {selection!r}")
        add, value, lmin = 0, 0.0, None
        items, index = self.items, self._index
        for name, rank in selection.items():
            k = index.get(name)
            if k is None:
                self.item(name)  # raises with the message
            if rank == 0 and not isinstance(rank, bool):
                continue
            it = items[k]
            o = it._rank_index.get(rank) if isinstance(rank, int) and not isinstance(rank, bool) else None
            if o is None:
                if not _is_int(rank) or rank < 0:
                    raise ProblemError(f"module {name!r}: rank must be an int >= 0, got {rank!r}")
                it.option(rank)  # raises: not one of the options
            add += it.costs[o]
            value += it.values[o]
            if lmin is None or it.block < lmin:
                lmin = it.block
        return self.fixed_bytes + add + self.activation_bytes(lmin), value, lmin

    def lowest_block(self, selection: Mapping[str, int]) -> int | None:
        """Lowest block with a trained module (rank > 0) in ``selection``; None when nothing trains."""
        return self.evaluate(selection)[2]

    def cost(self, selection: Mapping[str, int]) -> int:
        """Exact peak bytes of a plan (module name -> rank; rank 0 or absent = not trained).

        Empty selection = ``static_bytes + head_bytes``.
        """
        return self.evaluate(selection)[0]

    def value(self, selection: Mapping[str, int]) -> float:
        """Total value of a plan."""
        return self.evaluate(selection)[1]

    def is_feasible(self, selection: Mapping[str, int]) -> bool:
        """True when the plan's exact peak bytes fit the budget."""
        return self.cost(selection) <= self.budget

    def min_train_bytes(self) -> int:
        """Peak bytes of the cheapest plan that trains at least one module (one module, cheapest option).

        With no items, nothing can be trained: returns ``fixed_bytes`` (and every budget >= that is
        "feasible" with an empty plan).
        """
        return self.fixed_bytes + self._min_extra

    def max_train_bytes(self) -> int:
        """Peak bytes of training every module at its largest rank."""
        if not self.items:
            return self.fixed_bytes
        lmin = min(it.block for it in self.items)
        return self.fixed_bytes + sum(it.costs[-1] for it in self.items) + self._suffix[lmin]

    # --- derived problems --------------------------------------------------------------------------
    def restrict(self, names: Iterable[str]) -> AllocationProblem:
        """Sub-problem on a module subset (same blocks, budget and fixed costs); unknown names -> ProblemError."""
        wanted = list(names)
        for n in wanted:
            self.item(n)
        keep = set(wanted)
        return dataclasses.replace(self, items=tuple(it for it in self.items if it.name in keep))

    def with_budget(self, budget: int) -> AllocationProblem:
        """The same problem with another budget (bytes)."""
        return dataclasses.replace(self, budget=budget)

    def with_client(self, client: int | str | None) -> AllocationProblem:
        """The same problem tied to another client id."""
        return dataclasses.replace(self, client=client)


@dataclass
class Plan:
    """A solved allocation.

    Attributes:
        modules: trained modules only, name -> rank (> 0).
        status: see `PlanStatus`.
        objective: total value of the plan.
        predicted_bytes: exact peak bytes of the plan under the problem's cost model.
        budget: the budget it was solved for.
        backend: the backend that produced it (e.g. ``"dp-native"``).
        solve_time_s: wall-clock seconds spent solving (for batched solves, the batch time / clients).
        client: client id, if any.
        lowest_block: lowest trained block (None when nothing trains).
        message: free text (why infeasible, rounding slack, solver remarks).
        bound: an upper bound on the optimal objective when the backend has one (the DP's rounded-down
            relaxation; equals ``objective`` for optimal plans), else None.
    """

    modules: dict[str, int]
    status: PlanStatus
    objective: float
    predicted_bytes: int
    budget: int
    backend: str
    solve_time_s: float
    client: int | str | None = None
    lowest_block: int | None = None
    message: str = ""
    bound: float | None = None

    def __post_init__(self) -> None:
        self.status = PlanStatus(self.status)

    @property
    def feasible(self) -> bool:
        """True when the plan is usable (optimal, feasible, or a timeout with an incumbent that fits)."""
        return self.status in (PlanStatus.OPTIMAL, PlanStatus.FEASIBLE) or (
            self.status is PlanStatus.TIMEOUT and self.predicted_bytes <= self.budget
        )

    def blocks_trained(self, problem: AllocationProblem) -> list[int]:
        """Sorted distinct blocks with at least one trained module."""
        return sorted({problem.item(n).block for n in self.modules})

    def layers_trained(self, problem: AllocationProblem) -> list[int]:
        """Alias of `blocks_trained` (a block is a transformer layer)."""
        return self.blocks_trained(problem)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (status as its string)."""
        return {
            "client": self.client,
            "modules": dict(self.modules),
            "status": str(self.status),
            "objective": float(self.objective),
            "predicted_bytes": int(self.predicted_bytes),
            "budget": int(self.budget),
            "backend": self.backend,
            "solve_time_s": float(self.solve_time_s),
            "lowest_block": self.lowest_block,
            "message": self.message,
            "bound": None if self.bound is None else float(self.bound),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of `to_dict`; ProblemError quoting a bad status or missing key."""
        try:
            status = PlanStatus(data["status"])
        except ValueError:
            raise ProblemError(f"unknown plan status {data['status']!r}") from None
        except KeyError as exc:
            raise ProblemError(f"plan dict is missing key {exc.args[0]!r}") from None
        try:
            return cls(
                modules={str(k): int(v) for k, v in dict(data["modules"]).items()},
                status=status,
                objective=float(data["objective"]),
                predicted_bytes=int(data["predicted_bytes"]),
                budget=int(data["budget"]),
                backend=str(data["backend"]),
                solve_time_s=float(data.get("solve_time_s", 0.0)),
                client=data.get("client"),
                lowest_block=data.get("lowest_block"),
                message=str(data.get("message", "")),
                bound=None if data.get("bound") is None else float(data["bound"]),
            )
        except KeyError as exc:
            raise ProblemError(f"plan dict is missing key {exc.args[0]!r}") from None
