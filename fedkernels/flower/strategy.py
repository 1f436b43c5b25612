"""`HeteroLoRAStrategy`: a Flower Message-API strategy driving the same rounds as the in-process trainer.

Flower's own strategies cannot aggregate heterogeneous LoRA: `FedAvg.aggregate_train` requires every reply to
carry the same keys and ends the run otherwise (shared/docs/ecosystem.md sec. 0.1). This strategy implements
every step of Flower's `Strategy` on the trainer's seam instead of calling ``super()``:

- ``configure_train``: the trainer plans the round (`FederatedTrainer.plan_round`: the seeded sampling of the
  in-process engine, budgets the nodes reported through `FlowerExecutor.round_budgets`), and the executor builds one
  message per client with its plan and its slice of the global adapter (`fedkernels.flower.wire`);
- ``aggregate_train``: the executor validates the replies (error replies, silent nodes and bad replies are logged
  and excluded, one at a time) and the trainer aggregates them (`FederatedTrainer.finish_round`: the aggregation
  rule, "too few good replies keeps the global adapter", central evaluation);
- ``start`` is Flower's loop (configure_train -> ``grid.send_and_receive`` -> aggregate_train) between the trainer's
  `begin_run` / `commit_round` / `end_run`, so metrics, atomic per-round checkpoints, resume and the peft export
  are those of the in-process engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedkernels.errors import ConfigError
from fedkernels.federated.checkpoint import global_tensors
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.executor import RoundJob
from fedkernels.federated.trainer import FederatedTrainer, RunSummary
from fedkernels.flower import wire
from fedkernels.flower.executor import FlowerExecutor

try:  # the strategy subclasses Flower's; importing this module needs the `flower` extra
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("fedkernels.flower needs Flower: pip install 'fedkernels[flower]'") from exc

__all__ = ["HeteroLoRAStrategy"]

log = logging.getLogger("fedkernels.flower")


@dataclass
class _Round:
    """A round between ``configure_train`` and ``aggregate_train``: its job, planning time and send time."""

    job: RoundJob
    plan_s: float
    sent_at: float


class HeteroLoRAStrategy(Strategy):
    """Heterogeneous-LoRA federation on Flower's Message API (see the module docstring).

    Args:
        config: the run; the same `FederatedConfig` the in-process trainer takes (never mutated).
        round_timeout: seconds to wait for train replies; nodes silent by then count as failed.
        min_nodes: connected nodes to wait for before the first round (default 1).
        node_wait_s: how long to wait for them before giving up with `ConfigError`.
        query_timeout: seconds to wait for the node-info replies.
        dataset: a `datasets.Dataset` to use instead of ``config.dataset`` (server side: evaluation, calibration).
    """

    def __init__(self, config: FederatedConfig, *, round_timeout: float = 600.0, min_nodes: int = 1,
                 node_wait_s: float = 300.0, query_timeout: float = 120.0, dataset=None) -> None:
        self.executor = FlowerExecutor(config, round_timeout=round_timeout, min_nodes=min_nodes,
                                       node_wait_s=node_wait_s, query_timeout=query_timeout)
        self.trainer = FederatedTrainer(config, dataset=dataset, executor=self.executor)
        self.records: dict[int, dict] = {}  # round -> metrics record, from aggregate_train until committed
        self._rounds: dict[int, _Round] = {}

    @property
    def bytes_log(self) -> list[dict]:
        """Per round: array bytes down/up on the wire."""
        return self.executor.bytes_log

    # ------------------------------------------------------------------ Flower's Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """Discover nodes, plan round ``server_round`` and build one message per client. ``arrays`` is ignored: the
        server's global adapter (of mixed per-client shapes) lives in the trainer, not in one Flower ArrayRecord."""
        t = time.perf_counter()
        self.executor.bind(grid)
        job = self.trainer.plan_round(server_round)
        messages = self.executor.messages(job)
        self._rounds[server_round] = _Round(job, time.perf_counter() - t, time.perf_counter())
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate with the `fedkernels.aggregation` rule, evaluate centrally.

        Returns the new global adapter (``global.<module>.A|B`` and ``head.<key>``, the checkpoint's names) and the
        round's metrics; the full record waits in ``records[server_round]`` for `FederatedTrainer.commit_round`. A
        round with too few good replies keeps the global adapter (``skipped`` = 1). Nothing a node sends raises.
        """
        rnd = self._rounds.pop(server_round)
        t = time.perf_counter()
        outcome = self.executor.collect(rnd.job, replies, waited_s=t - rnd.sent_at)
        record = self.trainer.finish_round(rnd.job, outcome, {"plan": rnd.plan_s, "train": t - rnd.sent_at})
        self.records[server_round] = record
        # the task's evaluation (`Task.evaluate`): loss always; accuracy, or perplexity and, on generation rounds,
        # ROUGE-L / exact match per task and macro
        evaluated = {k: float(v) for k, v in record.items()
                     if k in ("accuracy", "loss", "perplexity") or k.split("/")[0] in ("rougeL", "exact_match", "loss")}
        return self.global_arrays(), MetricRecord({
            **evaluated,
            "skipped": int(record["skipped"]), "succeeded": len(record["succeeded"]),
            "bytes-up": int(record["bytes_up"]), "bytes-down": int(record["bytes_down"]),
        })

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return []  # evaluation is central (the server holds the test split), see `FederatedTrainer.evaluate`

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        tr = self.trainer
        cfg = tr.cfg
        log.info("HeteroLoRAStrategy: %s (allocation %s, rule %s), %d clients, fraction %s, %d rounds, "
                 "round timeout %.0fs", cfg.strategy, tr.allocation, tr.rule, cfg.num_clients, cfg.fraction,
                 cfg.rounds, self.executor.round_timeout)

    def global_arrays(self) -> ArrayRecord:
        """The global adapter and head under the checkpoint's names (`fedkernels.federated.checkpoint`)."""
        return wire.tensors_to_record(global_tensors(self.trainer.global_state, self.trainer.global_head))

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              resume: bool = False) -> RunSummary:
        """Flower's round loop on ``grid`` inside the trainer's run: `begin_run` (``resume`` from the latest
        checkpoint in ``output_dir``), then per round configure_train -> ``grid.send_and_receive`` -> aggregate_train
        -> `commit_round` (metrics line, atomic checkpoint), then `end_run` (peft export, summary).

        ``initial_arrays`` is ignored (the initial adapter comes from the seeded model); ``num_rounds`` replaces
        ``config.rounds`` (`FederatedTrainer.set_rounds`; the config object is left alone); ``timeout`` replaces
        ``round_timeout``; ``train_config`` goes to configure_train. Evaluation is central, so ``evaluate_config``
        must be empty and ``evaluate_fn`` None (`ConfigError` otherwise).
        """
        if evaluate_fn is not None or evaluate_config:
            raise ConfigError("HeteroLoRAStrategy evaluates centrally on the server's test split: evaluate_fn and "
                              f"evaluate_config are not used, got {evaluate_fn!r}, {evaluate_config!r}")
        tr = self.trainer
        if num_rounds is not None:
            tr.set_rounds(num_rounds)
        if timeout is not None:
            if not timeout > 0:
                raise ConfigError(f"timeout must be positive seconds, got {timeout!r}")
            self.executor.round_timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        self.summary()
        self.executor.bind(grid)
        tr.begin_run(resume=resume)
        arrays = self.global_arrays()
        while tr.round < tr.cfg.rounds:
            server_round = tr.round + 1
            messages = list(self.configure_train(server_round, arrays, train_config, grid))
            replies = grid.send_and_receive(messages, timeout=self.executor.round_timeout) if messages else []
            arrays, _metrics = self.aggregate_train(server_round, replies)
            tr.commit_round(self.records.pop(server_round))
        from fedkernels.io import atomic_write_json

        atomic_write_json(tr.out / "flower_bytes.json", self.bytes_log)
        return tr.end_run()
