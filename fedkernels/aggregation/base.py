"""Data types, validation and shared arithmetic of the aggregation rules.

A round: the server holds a `GlobalState` (per module ``A [R, in]``, ``B [out, R]``, LoRA scale), the sampled
clients send `ClientUpdate`s (whole adapters of the modules they trained, at their planned rank), and a rule's
`AggregationRule.aggregate` returns an `AggregationResult`. Formulas: shared/docs/algorithms.md.

Conventions shared by all rules (algorithms.md sec. 0 and 6):
- weights ``p_k = n_k / sum n_j`` are normalised **per module over the clients that trained it**;
- client scales ``s_k`` that differ from the global scale ``s_g`` are folded into the factors before any mixing
  (``sqrt(s_k / s_g)`` on each factor, so ``s_g B' A' = s_k B A``);
- arithmetic runs in at least float32 and the result is cast back to the global factors' dtype;
- updates are validated before any arithmetic and reduced in client-id order, so the result does not depend on
  arrival order.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedkernels.errors import ClientUpdateError, ConfigError, RankError, RejectReason, UnknownModuleError
from fedkernels.ops.factor_ops import SPLITS

__all__ = [
    "ClientUpdate",
    "GlobalState",
    "AggregationResult",
    "AggregationRule",
    "validate_update",
    "Factors",
]

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ClientUpdate:
    """What one client sends: its trained modules' factors ``A [r, in]``, ``B [out, r]`` (whole adapters, not
    deltas), the rank and LoRA scale of each, and its number of training samples (the FedAvg weight)."""

    client_id: int
    factors: Factors
    ranks: dict[str, int]
    scales: dict[str, float]
    num_samples: int


class GlobalState:
    """Server-side adapter state: ``factors`` (module -> ``(A [R, in], B [out, R])``, R = global max rank),
    ``scales`` (module -> LoRA scale) and ``extra``, the rule's persistent state (round counter, Fed-pilot
    staleness, HetLoRA pruned ranks...). ``extra`` values are tensors or JSON-able values."""

    def __init__(self, factors: Factors, scales: dict[str, float], extra: dict[str, Any] | None = None):
        missing = sorted(set(factors) - set(scales))
        if missing:
            raise ConfigError(f"GlobalState: no scale given for module(s) {missing}")
        for m, (A, B) in factors.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise ConfigError(
                    f"GlobalState: module {m!r} needs A [R, in] and B [out, R], got {tuple(A.shape)}, {tuple(B.shape)}"
                )
        self.factors: Factors = dict(factors)
        self.scales: dict[str, float] = {m: float(s) for m, s in scales.items()}
        self.extra: dict[str, Any] = {} if extra is None else extra

    @classmethod
    def from_factors(cls, factors: Factors, scales: dict[str, float]) -> GlobalState:
        """State with the given factors (detached copies) and scales and an empty ``extra``."""
        return cls({m: (A.detach().clone(), B.detach().clone()) for m, (A, B) in factors.items()}, scales)

    @property
    def round(self) -> int:
        """Number of aggregations done so far (the round about to be trained)."""
        return int(self.extra.get("round", 0))

    def rank(self, module: str) -> int:
        return int(self.factors[module][0].shape[0])

    def clone(self) -> GlobalState:
        return GlobalState(
            {m: (A.clone(), B.clone()) for m, (A, B) in self.factors.items()},
            dict(self.scales),
            {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in self.extra.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything but factors and scales (the trainer saves those itself): tensors stay tensors, the rest is
        checked to survive a JSON round trip (ConfigError naming the key otherwise)."""
        out: dict[str, Any] = {}
        for k, v in self.extra.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.detach().clone()
                continue
            try:
                back = json.loads(json.dumps(v))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"GlobalState.extra[{k!r}] = {v!r} is neither a tensor nor JSON-able") from exc
            if back != v:
                raise ConfigError(f"GlobalState.extra[{k!r}] = {v!r} does not survive a JSON round trip (as {back!r})")
            out[k] = copy.deepcopy(v)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extra = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


@dataclass
class AggregationResult:
    """Output of one aggregation.

    Attributes:
        global_state: the new server state (a new object; the input state is never mutated).
        client_starts: client id -> module -> factors the client starts from next round, only where they differ
            from the global factors truncated to its plan (FlexLoRA: its own best rank-r_i approximation).
        base_deltas: module -> ``(A_stack [S, in], B_stack [out, S], scale)``, to add into the frozen base weight
            as ``W += scale * B_stack @ A_stack`` (FLoRA).
        rejected: one error per rejected problem (several may name the same client).
        notes: human-readable remarks (modules nobody trained, pruned ranks, fallbacks).
    """

    global_state: GlobalState
    client_starts: dict[int, Factors] = field(default_factory=dict)
    base_deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    rejected: list[ClientUpdateError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- validation
def _err(msg: str, cid: object, module: str | None, reason: RejectReason) -> ClientUpdateError:
    return ClientUpdateError(msg, client=cid, module=module, reason=reason)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _non_finite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries. Fast path: one min/max pass (both propagate NaN; +-Inf lands in one of them),
    10x cheaper than materialising ``isfinite`` (27 vs 250 us for a 2048 x 64 fp32 factor); entries are only
    counted, for the error message, when something is wrong."""
    if t.numel() == 0 or not t.is_floating_point():
        return 0
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(t)).sum())


def validate_update(
    update: ClientUpdate, plan: dict[str, int] | None, global_state: GlobalState
) -> list[ClientUpdateError]:
    """All problems of ``update`` against its ``plan`` (module -> planned rank; None: client not sampled) and the
    global shapes, found before any arithmetic. Empty list: the update is usable."""
    cid = update.client_id
    errs: list[ClientUpdateError] = []
    if not _is_int(cid):
        return [_err(f"client id {cid!r} is not an integer", cid, None, RejectReason.CLIENT_ID)]
    if plan is None:
        return [_err(f"client {cid} sent an update but was not sampled this round (no plan)", cid, None,
                     RejectReason.NOT_SAMPLED)]
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(float(n)) or n <= 0 or (
        not _is_int(n) and not float(n).is_integer()
    ):
        errs.append(_err(f"client {cid}: num_samples must be a positive integer, got {n!r}", cid, None,
                         RejectReason.NUM_SAMPLES))
    if not isinstance(update.factors, dict):
        return errs + [_err(f"client {cid}: factors must be a dict, got {type(update.factors).__name__}", cid, None,
                            RejectReason.SHAPE)]
    for m in sorted(update.factors):
        if m not in global_state.factors:
            errs.append(_err(f"client {cid}: unknown module {m!r} (not in the global adapter)", cid, m,
                             RejectReason.UNKNOWN_MODULE))
        elif m not in plan:
            errs.append(_err(f"client {cid}: module {m!r} was not in its plan (planned: {sorted(plan)})", cid, m,
                             RejectReason.UNPLANNED_MODULE))
    for m in sorted(plan):
        if m not in update.factors:
            errs.append(_err(f"client {cid}: planned module {m!r} (rank {plan[m]}) is missing from the update", cid,
                             m, RejectReason.MISSING_MODULE))
    for m in sorted(set(update.factors) & set(plan) & set(global_state.factors)):
        pair = update.factors[m]
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            errs.append(_err(f"client {cid}, module {m!r}: wrong shape, factors must be a pair of tensors (A, B)",
                             cid, m, RejectReason.SHAPE))
            continue
        A, B = pair
        gA, gB = global_state.factors[m]
        R, d_in, d_out = gA.shape[0], gA.shape[1], gB.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            errs.append(_err(
                f"client {cid}, module {m!r}: wrong shape, A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                f"A [r, {d_in}], B [{d_out}, r]", cid, m, RejectReason.SHAPE))
            continue
        if not (A.is_floating_point() and B.is_floating_point()):
            errs.append(_err(f"client {cid}, module {m!r}: factors must be floating point, got {A.dtype}/{B.dtype}",
                             cid, m, RejectReason.DTYPE))
            continue
        r = A.shape[0]
        declared = update.ranks.get(m) if isinstance(update.ranks, dict) else None
        if declared != r:
            errs.append(_err(f"client {cid}, module {m!r}: declared rank {declared!r} but factors have rank {r}",
                             cid, m, RejectReason.RANK))
        if r != plan[m]:
            errs.append(_err(f"client {cid}, module {m!r}: rank {r} differs from the planned rank {plan[m]}", cid, m,
                             RejectReason.RANK))
        elif r > R:
            errs.append(_err(f"client {cid}, module {m!r}: rank {r} exceeds the global rank {R}", cid, m,
                             RejectReason.RANK))
        s = update.scales.get(m) if isinstance(update.scales, dict) else None
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)) or s <= 0:
            errs.append(_err(f"client {cid}, module {m!r}: LoRA scale must be a positive finite number, got {s!r}",
                             cid, m, RejectReason.SCALE))
        bad = _non_finite(A) + _non_finite(B)
        if bad:
            errs.append(_err(f"client {cid}, module {m!r}: {bad} non-finite (NaN/Inf) entries in A/B", cid, m,
                             RejectReason.NON_FINITE))
    return errs


# ----------------------------------------------------------------------------------------------- rules
@dataclass
class RuleOptions:
    """Options shared by every rule. ``weighting``: "samples" (p_k proportional to n_k) or "uniform"."""

    weighting: str = "samples"

    def __post_init__(self) -> None:
        if self.weighting not in ("samples", "uniform"):
            raise ConfigError(f"weighting must be 'samples' or 'uniform', got {self.weighting!r}")


def check_server_lr(rule: str, value: Any) -> None:
    """A rule's ``server_lr`` option: the server's step towards the clients' average, a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{rule} option server_lr must be a number in (0, 1], got {value!r}")


def check_factor_split(rule: str, value: Any) -> None:
    """A rule's ``factor_split`` option: how its SVD re-factorisation puts the singular values on the factors
    (`fedkernels.ops.factor_ops.flexlora_redistribute`, which names the choices in ``SPLITS``)."""
    if value not in SPLITS:
        raise ConfigError(f"{rule} option factor_split must be one of {SPLITS}, got {value!r}")


def step_toward(old: torch.Tensor, target: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """``old + step * (target - old)`` computed in ``dtype``, returned in ``old``'s dtype: a server step of ``step``
    from the global factor towards the clients' average (Fed-pilot's eta, a rule's ``server_lr``)."""
    return (old.to(dtype) + step * (target.to(dtype) - old.to(dtype))).to(old.dtype)


def _sort_key(u: ClientUpdate) -> tuple:
    return (0, int(u.client_id), "") if _is_int(u.client_id) else (1, 0, repr(u.client_id))


class AggregationRule:
    """Base class: validation, ordering and per-module weights; subclasses implement `_aggregate`."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = RuleOptions
    #: True when `aggregate` returns ``base_deltas`` that the server merges into the frozen base weights (FLoRA):
    #: the base weights are then part of the run's state (checkpointed, sent to remote clients every round) and
    #: are exported next to the adapter. False: the base stays the pretrained one and only the adapter moves.
    mutates_base: ClassVar[bool] = False

    @property
    def head_step(self) -> float:
        """The server's step on a trained head: ``head' = head + head_step * (clients' average - head)``; 1 is
        FedAvg's replacement (every paper rule). A rule with a server step size declares it here."""
        return 1.0

    def __init__(self, **options: Any):
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"aggregation rule {self.name!r}: unknown option(s) {unknown}; valid: {sorted(valid)}")
        self.options = self.Options(**options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -------------------------------------------------------------- public API
    def aggregate(
        self, global_state: GlobalState, updates: list[ClientUpdate], plans: dict[int, dict[str, int]]
    ) -> AggregationResult:
        """Validate every update, reject the bad ones, aggregate the rest in client-id order.

        ``global_state`` is not mutated; the result's state has its round counter advanced by one.
        """
        state = global_state.clone()
        result = AggregationResult(global_state=state)
        ordered = sorted(updates, key=_sort_key)
        counts: dict[object, int] = {}
        for u in ordered:
            counts[u.client_id] = counts.get(u.client_id, 0) + 1
        good: list[ClientUpdate] = []
        for u in ordered:
            if counts[u.client_id] > 1:  # reject every copy: keeping "the first" would depend on arrival order
                result.rejected.append(_err(f"client {u.client_id} sent {counts[u.client_id]} updates this round",
                                            u.client_id, None, RejectReason.DUPLICATE))
                continue
            errs = validate_update(u, plans.get(u.client_id) if _is_int(u.client_id) else None, global_state)
            if errs:
                result.rejected.extend(errs)
            else:
                good.append(u)
        self._aggregate(state, good, plans, result)
        state.extra["round"] = global_state.round + 1
        return result

    def start_for(
        self, global_state: GlobalState, client_id: int, plan: dict[str, int], scales: dict[str, float] | None = None
    ) -> Factors:
        """Factors client ``client_id`` starts from under ``plan``: the global factors truncated to the planned rank,
        expressed at the client's LoRA scale ``scales[m]`` (default: the global scale), so that
        ``s_k B_k A_k == s_g B_g A_g`` on the kept ranks and a round in which the client changes nothing leaves the
        global product unchanged (the inverse of `folded`)."""
        out: Factors = {}
        for m, r in plan.items():
            A, B = self.planned_factors(global_state, client_id, m, r)
            A, B = A[:r].clone(), B[:, :r].clone()
            ratio = client_scale_ratio(global_state, client_id, m, scales)
            if ratio != 1.0:
                A, B = self.unfold(A, B, ratio)
            out[m] = (A, B)
        return out

    #: True for rules whose A is the shared frozen one (FFA): the whole scale ratio then goes on B, never on A.
    frozen_A: ClassVar[bool] = False

    def unfold(self, A: torch.Tensor, B: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Global factors rewritten for a client whose scale is ``s_k = s_g / ratio``: ``sqrt(ratio)`` on each
        factor (``ratio`` on B alone when A is frozen), so that ``s_k B' A' == s_g B A``."""
        if self.frozen_A:
            return A, (B.to(compute_dtype(B)) * ratio).to(B.dtype)
        f = math.sqrt(ratio)
        return (A.to(compute_dtype(A)) * f).to(A.dtype), (B.to(compute_dtype(B)) * f).to(B.dtype)

    @staticmethod
    def planned_factors(
        global_state: GlobalState, client_id: int, module: str, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global (A, B) of a planned module, after checking the module exists and the rank fits."""
        if module not in global_state.factors:
            raise UnknownModuleError(f"client {client_id}: planned module {module!r} is not in the global adapter")
        A, B = global_state.factors[module]
        if not 0 < rank <= A.shape[0]:
            raise RankError(f"client {client_id}, module {module!r}: planned rank {rank} outside 1..{A.shape[0]}")
        return A, B

    def local_penalty(self, client_id: int) -> Callable[[Factors], torch.Tensor] | None:
        """A term client ``client_id`` adds to its local loss, as a function of its live (differentiable) factors
        ``{module: (A [r, in], B [out, r])}`` at their active ranks; ``None`` (the default) for no term. It
        depends on the rule's options only, so a remote client (Flower) builds the same term from the config."""
        return None

    # -------------------------------------------------------------- for subclasses
    def _aggregate(self, state: GlobalState, updates: list[ClientUpdate], plans: dict[int, dict[str, int]],
                   result: AggregationResult) -> None:
        raise NotImplementedError

    def raw_weight(self, u: ClientUpdate) -> float:
        return 1.0 if self.options.weighting == "uniform" else float(u.num_samples)

    def trained_modules(
        self, state: GlobalState, updates: list[ClientUpdate], result: AggregationResult
    ) -> Iterator[tuple[str, list[tuple[ClientUpdate, float]]]]:
        """``(module, trainers)`` for every module of ``state`` somebody trained; the others are noted as untrained
        (and left unchanged) in ``result``. For rules with nothing to do on an untrained module."""
        for m in state.factors:
            ts = self.trainers(updates, m)
            if ts:
                yield m, ts
            else:
                note_untrained(result, m)

    def trainers(self, updates: list[ClientUpdate], module: str) -> list[tuple[ClientUpdate, float]]:
        """Clients that trained ``module`` with weights normalised over them (sum 1), in client-id order."""
        ts = [u for u in updates if module in u.factors]
        total = sum(self.raw_weight(u) for u in ts)
        return [(u, self.raw_weight(u) / total) for u in ts] if total > 0 else []


def client_scale_ratio(global_state: GlobalState, client_id: object, module: str,
                       scales: dict[str, float] | None) -> float:
    """``s_g / s_k`` for a client starting ``module`` at scale ``s_k = scales[module]`` (1.0 without a scale)."""
    if scales is None or module not in scales:
        return 1.0
    s = scales[module]
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)) or s <= 0:
        raise ConfigError(f"client {client_id}, module {module!r}: start scale must be a positive finite number, "
                          f"got {s!r}")
    return float(global_state.scales[module]) / float(s)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32 (algorithms.md sec. 6: always aggregate in fp32)."""
    return torch.promote_types(t.dtype, torch.float32)


def folded(u: ClientUpdate, module: str, global_scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Client factors with ``sqrt(s_k / s_g)`` on each, so that ``s_g B' A' == s_k B A``."""
    A, B = u.factors[module]
    A, B = A.to(dtype), B.to(dtype)
    ratio = float(u.scales[module]) / global_scale
    if ratio != 1.0:
        f = math.sqrt(ratio)
        A, B = A * f, B * f
    return A, B


def note_untrained(result: AggregationResult, module: str) -> None:
    result.notes.append(f"module {module!r}: no client trained it this round (zero total weight); left unchanged")


def average_by_rank(
    gA: torch.Tensor, gB: torch.Tensor, contribs: list[tuple[torch.Tensor, torch.Tensor, float]], *, pad: str = "rows"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of factors of possibly smaller ranks into the global rank R.

    ``pad="rows"``: rank row j (A row / B column) is averaged over the clients whose rank covers it, with weights
    renormalised over them (the per-key rule of algorithms.md sec. 0 applied to rank slices); rows no client covers
    keep the global value. ``pad="zero"``: zero-pad each client to R and take ``sum w_k pad(.)`` (HetLoRA;
    FLoRA's zero-padding baseline), so uncovered rows become zero.
    """
    dtype = compute_dtype(gA)
    R = gA.shape[0]
    accA = torch.zeros(gA.shape, dtype=dtype, device=gA.device)
    accB = torch.zeros(gB.shape, dtype=dtype, device=gB.device)
    den = torch.zeros(R, dtype=dtype, device=gA.device)
    for A, B, w in contribs:
        r = A.shape[0]
        accA[:r].add_(A.to(dtype), alpha=w)
        accB[:, :r].add_(B.to(dtype), alpha=w)
        den[:r] += w
    if pad == "zero":
        return accA.to(gA.dtype), accB.to(gB.dtype)
    covered = den > 0
    safe = torch.where(covered, den, torch.ones_like(den))
    newA = torch.where(covered[:, None], accA / safe[:, None], gA.to(dtype))
    newB = torch.where(covered[None, :], accB / safe[None, :], gB.to(dtype))
    return newA.to(gA.dtype), newB.to(gB.dtype)
