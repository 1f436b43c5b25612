"""The client-execution seam: the round loop hands a `RoundJob` to a `ClientExecutor` and gets a `RoundOutcome`.

Data flows one way. The trainer plans a round (sampled clients, their plans and budgets, start factors, the
rule's loss terms, which clients measure their memory, fault injection) into a `RoundJob`; an executor trains the
clients and returns their results, one log entry per client and the failures; the trainer validates, aggregates
and checkpoints. Executors never call back into the trainer:

- `SequentialExecutor`: one client after the other on the shared model (`fedkernels.federated.client.train_client`);
- `ParallelExecutor`: groups of clients in one shared forward/backward (`fedkernels.federated.parallel.train_group`),
  the clients it cannot group (a loss term, a memory measurement, a group that raised) through its
  `SequentialExecutor`;
- `fedkernels.flower.executor.FlowerExecutor`: a round trip to Flower SuperNodes, which also report the budgets.

A client that raises is logged and excluded (status ``failed``), the round goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedkernels.errors import ConfigError
from fedkernels.federated.client import (
    ClientJob,
    ClientResult,
    FaultFn,
    LocalTraining,
    Penalty,
    SharedModel,
    train_client,
)
from fedkernels.federated.parallel import train_group

__all__ = ["ClientExecutor", "RoundJob", "RoundOutcome", "SequentialExecutor", "ParallelExecutor"]

log = logging.getLogger("fedkernels.federated")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int], None]  # advance(number of clients done)


@dataclass
class RoundJob:
    """One round's local training, as the server planned it.

    Attributes:
        round_idx: the round (1-based).
        sampled: the clients to train, in the order their results are reported.
        plans: client -> `solvers` plan (``.modules``: module -> rank, ``.predicted_bytes``).
        budgets: client -> memory budget in bytes (what the plan was solved for).
        starts: client -> start factors of its planned modules (the aggregation rule's `start_for`).
        global_factors, global_head: the global adapter and classification head every client downloads.
        scales: module -> LoRA scale of the global adapter (every client trains at it; the server's, not theirs).
        indices: client -> its training example indices (``len`` is its aggregation weight).
        penalties: client -> the rule's local loss term (`AggregationRule.local_penalty`) or None.
        measure: clients that measure their training memory this round (the first of each unmeasured plan).
        inject_fault: ``inject(client, result) -> result`` applied to every in-process result (tests, demos).
        base_weights: module -> frozen base weight when the rule merges into it (`AggregationRule.mutates_base`):
            remote clients must train on the merged base; None otherwise.
    """

    round_idx: int
    sampled: list[int]
    plans: dict[int, Any]
    budgets: dict[int, int]
    starts: dict[int, Factors]
    global_factors: Factors
    global_head: dict[str, torch.Tensor]
    scales: dict[str, float]
    indices: dict[int, np.ndarray]
    penalties: dict[int, Penalty | None] = field(default_factory=dict)
    measure: frozenset[int] = frozenset()
    inject_fault: FaultFn | None = None
    base_weights: dict[str, torch.Tensor] | None = None

    def client(self, cid: int) -> ClientJob:
        """What client ``cid`` trains on."""
        return ClientJob(client_id=cid, round_idx=self.round_idx, plan=self.plans[cid].modules, start=self.starts[cid],
                         global_factors=self.global_factors, global_head=self.global_head, indices=self.indices[cid],
                         penalty=self.penalties.get(cid), measure_memory=cid in self.measure)

    def entry(self, cid: int) -> dict:
        """Client ``cid``'s log entry before training (metrics.jsonl ``clients``)."""
        plan = self.plans[cid]
        return {"client": cid, "budget": self.budgets[cid], "planned_bytes": plan.predicted_bytes,
                "modules": len(plan.modules), "ranks": sorted(set(plan.modules.values()))}

    def subset(self, cids: Iterable[int]) -> RoundJob:
        """The same round restricted to ``cids``."""
        return dataclasses.replace(self, sampled=list(cids))

    def inject(self, cid: int, res: ClientResult) -> ClientResult:
        return res if self.inject_fault is None else self.inject_fault(cid, res)


@dataclass
class RoundOutcome:
    """What an executor returns: the results of the clients that trained, one log entry per sampled client (in
    sampled order), the failures (``{"client", "reason"}``) and client -> measured training bytes (recorded for its
    plan even when the client failed afterwards)."""

    results: list[ClientResult] = field(default_factory=list)
    client_log: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    measurements: dict[int, int] = field(default_factory=dict)

    def trained(self, res: ClientResult, entry: dict) -> None:
        self.results.append(res)
        entry.update(status="trained", loss=res.loss, wall_s=res.wall_s)
        self.client_log.append(entry)

    def failed(self, round_idx: int, cid: int, entry: dict, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("round %d: client %d failed: %s", round_idx, cid, reason)
        self.failures.append({"client": cid, "reason": reason})
        entry.update(status="failed", reason=reason)
        self.client_log.append(entry)

    @classmethod
    def merge(cls, parts: Iterable[RoundOutcome], order: list[int]) -> RoundOutcome:
        """One outcome of ``parts`` with results, log entries and failures in ``order`` (the sampled order)."""
        pos = {c: i for i, c in enumerate(order)}
        out = cls()
        for p in parts:
            out.results += p.results
            out.client_log += p.client_log
            out.failures += p.failures
            out.measurements.update(p.measurements)
        out.results.sort(key=lambda r: pos[r.client_id])
        out.client_log.sort(key=lambda e: pos[e["client"]])
        out.failures.sort(key=lambda f: pos[f["client"]])
        return out


class ClientExecutor(ABC):
    """Runs the local training of a round: `train` (required) and `round_budgets` (where budgets come from)."""

    def round_budgets(self, round_idx: int, configured: dict[int, int],
                      check: Callable[[dict[int, int]], None]) -> dict[int, int]:
        """Client -> memory budget to plan round ``round_idx`` with. ``configured``: the config's budgets;
        ``check(budgets)`` raises `solvers.errors.InfeasibleBudgetError` for a budget no plan fits. In-process
        clients have the configured budgets; remote nodes report their own (`FlowerExecutor`)."""
        del round_idx, check
        return configured

    @abstractmethod
    def train(self, job: RoundJob, progress: Progress | None = None) -> RoundOutcome:
        """Train ``job.sampled``; ``progress(n)`` (if given) after every ``n`` clients done."""


class SequentialExecutor(ClientExecutor):
    """Clients one after another on the shared model ``on`` with ``settings``."""

    def __init__(self, on: SharedModel, settings: LocalTraining) -> None:
        self.on = on
        self.settings = settings

    def train(self, job: RoundJob, progress: Progress | None = None) -> RoundOutcome:
        out = RoundOutcome()
        for cid in job.sampled:
            entry = job.entry(cid)
            try:
                res = train_client(job.client(cid), on=self.on, settings=self.settings)
                if res.measured_bytes is not None:
                    out.measurements[cid] = int(res.measured_bytes)
                out.trained(job.inject(cid, res), entry)
            except Exception as exc:  # noqa: BLE001 - a crashing client is logged and excluded, the round goes on
                out.failed(job.round_idx, cid, entry, exc)
            if progress is not None:
                progress(1)
        return out


class ParallelExecutor(ClientExecutor):
    """Groups of up to ``group_size`` clients per shared forward/backward (`fedkernels.federated.parallel`).

    Trained alone by ``fallback`` (the reason logged): every client when a rule adds a loss term or the layers have
    LoRA dropout (the multi-client layer has none), clients measuring their memory (one client's own step), groups
    of one, and every client of a group that raised (so a faulty client is isolated as without parallelism).
    """

    def __init__(self, on: SharedModel, settings: LocalTraining, group_size: int,
                 fallback: SequentialExecutor | None = None) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ConfigError(f"ParallelExecutor.group_size must be an integer >= 2, got {group_size!r}")
        self.on = on
        self.settings = settings
        self.group_size = group_size
        self.fallback = fallback if fallback is not None else SequentialExecutor(on, settings)

    def _all_sequential(self, job: RoundJob) -> str | None:
        penalised = [c for c in job.sampled if job.penalties.get(c) is not None]
        if penalised:
            return f"the rule adds a client-side loss term for clients {penalised}"
        dropout = sorted({layer.dropout for layer in self.on.layers.values() if layer.dropout > 0})
        if dropout:
            return f"the multi-client layer has no LoRA dropout (lora_dropout={dropout[0]!r})"
        return None

    def train(self, job: RoundJob, progress: Progress | None = None) -> RoundOutcome:
        why = self._all_sequential(job)
        if why is not None:
            log.info("round %d: parallel groups of %d off: %s", job.round_idx, self.group_size, why)
            return self.fallback.train(job, progress)
        parts = []
        alone = [c for c in job.sampled if c in job.measure]  # memory measurement is sequential-only
        if alone:
            parts.append(self.fallback.train(job.subset(alone), progress))
        pending = [c for c in job.sampled if c not in job.measure]
        for lo in range(0, len(pending), self.group_size):
            group = pending[lo: lo + self.group_size]
            if len(group) == 1:
                parts.append(self.fallback.train(job.subset(group), progress))
                continue
            try:
                results = train_group([job.client(c) for c in group], on=self.on, settings=self.settings)
            except Exception as exc:  # noqa: BLE001 - retrain the group one by one so the faulty client is isolated
                log.warning("round %d: parallel group %s fell back to sequential training: %s: %s", job.round_idx,
                            group, type(exc).__name__, exc)
                parts.append(self.fallback.train(job.subset(group), progress))
                continue
            part = RoundOutcome()
            for cid, res in zip(group, results, strict=True):
                entry = job.entry(cid)
                try:
                    part.trained(job.inject(cid, res), entry)
                except Exception as exc:  # noqa: BLE001 - same isolation as the sequential path
                    part.failed(job.round_idx, cid, entry, exc)
            parts.append(part)
            if progress is not None:
                progress(len(group))
        return RoundOutcome.merge(parts, job.sampled)
