"""`HeteroLoRAStrategy`: a Flower Message-API strategy driving the same rounds as the in-process trainer.

Flower's own strategies cannot aggregate heterogeneous LoRA: `FedAvg.aggregate_train` requires every reply to
carry the same keys and ends the run otherwise (shared/docs/ecosystem.md sec. 0.1). This strategy overrides every
step instead of calling ``super()``:

- nodes are clients: each SuperNode says, through a ``query`` message, which ``partition-id`` it holds and its
  ``memory-budget`` (both from ``--node-config``);
- each round samples client ids with the trainer's seeded RNG (`FederatedTrainer.sample_clients`, a function of
  (seed, round) only, unlike Flower's unseeded ``random.sample``), plans them with `solvers` from the node
  budgets, and sends each node its plan and its slice of the global adapter (`fedkernels.flower.wire`);
- every reply is validated (`wire.parse_reply`); error replies, silent nodes and bad replies are logged and
  excluded; the rest go to the same `FederatedTrainer._finish_round` as in-process (aggregation rule, "too few
  good replies keeps the global adapter", central evaluation);
- `start` runs the trainer's own loop (`FederatedTrainer.run`), so metrics, atomic per-round checkpoints, resume
  and the peft export are those of the in-process engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fedkernels.errors import ClientUpdateError, ConfigError
from fedkernels.federated.client import ClientResult
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.trainer import FederatedTrainer, RunSummary
from fedkernels.flower import wire

try:  # the strategy subclasses Flower's; importing this module needs the `flower` extra
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("fedkernels.flower needs Flower: pip install 'fedkernels[flower]'") from exc

__all__ = ["HeteroLoRAStrategy", "FlowerTrainer", "NodeInfo"]

log = logging.getLogger("fedkernels.flower")

QUERY_NODE_INFO = "node-info"


@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    budget: int | None  # bytes; None: the node did not say, the config's budget for its partition is used


@dataclass
class _Pending:
    """What the server sent this round, to check replies against."""

    sampled: list[int]
    plans: dict
    node_of: dict[int, int]  # client id -> node id
    bytes_down: dict[int, int]  # client id -> array bytes sent
    failures: list[dict] = field(default_factory=list)
    client_log: dict[int, dict] = field(default_factory=dict)


def parse_budget(value: object, node_id: int) -> int | None:
    """``memory-budget`` from a node config: bytes as an int, or a string such as ``"6GiB"``; absent: None."""
    if value is None or value == "":
        return None
    import solvers

    if isinstance(value, bool):
        raise ConfigError(f"node {node_id}: memory-budget must be bytes or a size like '6GiB', got {value!r}")
    if isinstance(value, int | float):
        return int(value)
    return int(solvers.parse_bytes(str(value)))


class FlowerTrainer(FederatedTrainer):
    """The in-process trainer with local training replaced by a round trip to the SuperNodes."""

    strategy: HeteroLoRAStrategy
    grid: Grid | None = None

    def _run_round(self, round_idx: int, bar) -> dict:
        self.strategy.discover_nodes(self.grid)  # budgets may change when nodes join: refresh before planning
        return super()._run_round(round_idx, bar)

    def _train_clients(self, round_idx: int, sampled: list[int], plans: dict, bar
                       ) -> tuple[list[ClientResult], list[dict], list[dict]]:
        messages = self.strategy.train_messages(round_idx, sampled, plans)
        t = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=self.strategy.round_timeout)) if messages else []
        return self.strategy.collect(round_idx, replies, waited_s=time.monotonic() - t)


class HeteroLoRAStrategy(Strategy):
    """Heterogeneous-LoRA federation on Flower's Message API (see the module docstring).

    Args:
        config: the run; the same `FederatedConfig` the in-process trainer takes.
        round_timeout: seconds to wait for train replies; nodes silent by then count as failed.
        min_nodes: connected nodes to wait for before the first round (default 1).
        node_wait_s: how long to wait for them before giving up with `ConfigError`.
        query_timeout: seconds to wait for the node-info replies.
        dataset: a `datasets.Dataset` to use instead of ``config.dataset`` (server side: evaluation, calibration).
    """

    def __init__(self, config: FederatedConfig, *, round_timeout: float = 600.0, min_nodes: int = 1,
                 node_wait_s: float = 300.0, query_timeout: float = 120.0, dataset=None) -> None:
        if round_timeout <= 0:
            raise ConfigError(f"round_timeout must be positive, got {round_timeout!r}")
        if min_nodes < 0:
            raise ConfigError(f"min_nodes must be >= 0, got {min_nodes!r}")
        self.cfg = config
        self.round_timeout = float(round_timeout)
        self.min_nodes = int(min_nodes)
        self.node_wait_s = float(node_wait_s)
        self.query_timeout = float(query_timeout)
        self.trainer = FlowerTrainer(config, dataset=dataset)
        self.trainer.strategy = self
        self.config_budgets = dict(self.trainer.budgets)  # per partition, from the config (fallback)
        self.nodes: dict[int, NodeInfo] = {}
        self._queried: set[int] = set()
        self._pending: dict[int, _Pending] = {}
        self.bytes_log: list[dict] = []  # per round: array bytes down/up on the wire
        self._config_json = json.dumps(config.to_dict(), sort_keys=True)

    # ------------------------------------------------------------------ nodes
    def register_node(self, node_id: int, node_config: dict) -> NodeInfo:
        """Record a node's ``partition-id`` and ``memory-budget`` (from its ``--node-config``)."""
        pid = node_config.get("partition-id")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < self.cfg.num_clients:
            raise ConfigError(f"node {node_id}: partition-id must be an integer in [0, {self.cfg.num_clients}), "
                              f"got {pid!r}")
        info = NodeInfo(int(node_id), int(pid), parse_budget(node_config.get("memory-budget"), node_id))
        self.nodes[int(node_id)] = info
        self._refresh_budgets()
        return info

    def _refresh_budgets(self) -> None:
        budgets = dict(self.config_budgets)
        for info in sorted(self.nodes.values(), key=lambda i: i.node_id):
            if info.budget is not None:
                budgets[info.partition_id] = info.budget
        if budgets != self.trainer.budgets:
            self.trainer.planner.check_feasible(budgets)  # a node too small for any plan: stop, naming it
            self.trainer.budgets = budgets
            self.trainer.planner._fixed = None  # cached fixed plans were solved for the old budgets

    def node_for(self, client_id: int, online: set[int] | None = None) -> int | None:
        """The node holding partition ``client_id`` (lowest node id if several claim it), among ``online``."""
        ids = sorted(n for n, i in self.nodes.items() if i.partition_id == client_id
                     and (online is None or n in online))
        return ids[0] if ids else None

    def discover_nodes(self, grid: Grid) -> None:
        """Wait for ``min_nodes`` nodes (first call), then ask every node not yet seen for its node config."""
        online = set(grid.get_node_ids())
        if not self._queried:
            deadline = time.monotonic() + self.node_wait_s
            while len(online) < self.min_nodes:
                if time.monotonic() > deadline:
                    raise ConfigError(f"only {len(online)} SuperNode(s) connected after {self.node_wait_s:.0f}s, "
                                      f"min_nodes={self.min_nodes}")
                time.sleep(0.5)
                online = set(grid.get_node_ids())
        new = sorted(online - self._queried)
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({"fedkernels": QUERY_NODE_INFO})}), dst_node_id=n,
                        message_type="query") for n in new]
        replies = list(grid.send_and_receive(msgs, timeout=self.query_timeout))
        for reply in replies:
            nid = reply.metadata.src_node_id
            self._queried.add(nid)
            if reply.has_error():
                log.warning("node %d: node-info query failed: %s", nid, reply.error.reason)
                continue
            self.register_node(nid, dict(reply.content["config"]))
        self._queried.update(new)
        log.info("nodes: %s", {n: (i.partition_id, i.budget) for n, i in sorted(self.nodes.items())})

    # ------------------------------------------------------------------ one round, in pieces
    def plan_round(self, round_idx: int) -> tuple[list[int], dict]:
        tr = self.trainer
        sampled = tr.sample_clients(round_idx)
        return sampled, tr.planner.plans_for_round(round_idx, sampled, tr.budgets)

    def train_messages(self, round_idx: int, sampled: list[int], plans: dict,
                       online: set[int] | None = None) -> list[Message]:
        """One ``train`` message per sampled client that has a node; the others are recorded as failed."""
        tr = self.trainer
        pending = _Pending(sampled, plans, {}, {})
        messages = []
        measuring: set[str] = set()
        base = {m: l.base_layer.weight for m, l in tr.layers.items()} if tr.rule_name == "flora" else None
        for cid in sampled:
            plan = plans[cid]
            entry = {"client": cid, "budget": tr.budgets[cid], "planned_bytes": plan.predicted_bytes,
                     "modules": len(plan.modules), "ranks": sorted(set(plan.modules.values()))}
            pending.client_log[cid] = entry
            node = self.node_for(cid, online)
            if node is None:
                reason = f"no SuperNode holds partition-id {cid}"
                log.warning("round %d: client %d failed: %s", round_idx, cid, reason)
                pending.failures.append({"client": cid, "reason": reason})
                entry.update(status="failed", reason=reason)
                continue
            start = tr.client_starts.get(cid) or tr.rule_start(cid, plan.modules)
            # In-process, a plan is measured by the first client that trains it (the measurement's forward pass
            # draws dropout randomness, so it changes that client's update): ask exactly that client here too.
            key = tr.planner._key(plan.modules)
            measure = tr.cfg.measure_memory and not tr.planner.measured(plan.modules) and key not in measuring
            if measure:
                measuring.add(key)
            content = wire.encode_train_message(
                client_id=cid, round_idx=round_idx, plan=plan.modules, start=start,
                global_factors=tr.global_state.factors, global_head=tr.global_head, config_json=self._config_json,
                measure_memory=measure, base_weights=base)
            pending.node_of[cid] = node
            pending.bytes_down[cid] = wire.record_nbytes(content["arrays"])
            entry["node"] = node
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(round_idx)))
        self._pending[round_idx] = pending
        return messages

    def collect(self, round_idx: int, replies: Iterable[Message], waited_s: float | None = None
                ) -> tuple[list[ClientResult], list[dict], list[dict]]:
        """Validate the replies of round ``round_idx``: (results, client log, failures), bad ones logged and out."""
        tr = self.trainer
        pending = self._pending.pop(round_idx)
        client_of = {n: c for c, n in pending.node_of.items()}
        failures = list(pending.failures)
        results: dict[int, ClientResult] = {}
        seen: set[int] = set()
        bytes_up = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = client_of.get(node)
            if cid is None:
                log.warning("round %d: reply from node %d, which was sent nothing: ignored", round_idx, node)
                continue
            entry = pending.client_log[cid]
            if cid in seen:  # keep neither: "the first" would depend on arrival order
                results.pop(cid, None)
                self._fail(round_idx, cid, "node sent more than one reply", entry, failures, "rejected")
                continue
            seen.add(cid)
            if not reply.has_error():
                bytes_up += wire.record_nbytes(reply.content["arrays"]) if "arrays" in reply.content else 0
            try:
                res = wire.parse_reply(reply, client_id=cid, plan=pending.plans[cid].modules,
                                       global_factors=tr.global_state.factors, global_head=tr.global_head)
            except ClientUpdateError as exc:
                status = "failed" if exc.reason == "error_reply" else "rejected"
                self._fail(round_idx, cid, str(exc), entry, failures, status, module=exc.module)
                continue
            res.bytes_down = pending.bytes_down[cid]
            if res.measured_bytes is not None:
                tr.planner.record_measurement(pending.plans[cid].modules, res.measured_bytes)
            entry.update(status="trained", loss=res.loss, wall_s=res.wall_s,
                         measured_bytes=tr.planner.measured(pending.plans[cid].modules))
            results[cid] = res
        for cid in pending.node_of:
            if cid not in seen:
                # the SuperLink may give up on a node it sees die before the timeout
                waited = f"after {waited_s:.0f}s" if waited_s is not None else "by the deadline"
                reason = (f"no reply from node {pending.node_of[cid]} {waited} (round timeout "
                          f"{self.round_timeout:.0f}s)")
                self._fail(round_idx, cid, reason, pending.client_log[cid], failures, "failed")
        self.bytes_log.append({"round": round_idx, "bytes_down": int(sum(pending.bytes_down.values())),
                               "bytes_up": int(bytes_up)})
        client_log = [pending.client_log[c] for c in pending.sampled]
        return [results[c] for c in sorted(results)], client_log, failures

    @staticmethod
    def _fail(round_idx: int, cid: int, reason: str, entry: dict, failures: list, status: str,
              module: str | None = None) -> None:
        log.warning("round %d: client %d %s: %s", round_idx, cid, status, reason)
        item = {"client": cid, "reason": reason}
        if module is not None:
            item["module"] = module
        failures.append(item)
        entry.update(status=status, reason=reason)

    # ------------------------------------------------------------------ Flower's Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """Sample, plan and build one message per client. ``arrays`` is ignored: the server's global adapter
        (possibly of mixed per-client shapes) lives in the trainer, not in one Flower ArrayRecord."""
        self.discover_nodes(grid)
        sampled, plans = self.plan_round(server_round)
        self._plan_time = time.perf_counter()
        return self.train_messages(server_round, sampled, plans, set(grid.get_node_ids()))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate with the `fedkernels.aggregation` rule, evaluate centrally.

        Returns the new global adapter (``global/<module>/A|B`` and ``head/<key>``) and the round's metrics; a round
        with too few good replies keeps the global adapter (``skipped`` = 1).
        """
        tr = self.trainer
        pending = self._pending[server_round]
        results, client_log, failures = self.collect(server_round, replies)
        timings = {"plan": 0.0, "train": 0.0, "aggregate": 0.0, "eval": 0.0}
        record = tr._finish_round(server_round, pending.sampled, pending.plans, results, client_log, failures,
                                  timings)
        tr.round = server_round
        tr.history.append(record)
        return self.global_arrays(), MetricRecord({
            "accuracy": float(record["accuracy"]), "loss": float(record["loss"]),
            "skipped": int(record["skipped"]), "succeeded": len(record["succeeded"]),
            "bytes-up": int(record["bytes_up"]), "bytes-down": int(record["bytes_down"]),
        })

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return []  # evaluation is central (the server holds the test split), see `FederatedTrainer.evaluate`

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.cfg
        log.info("HeteroLoRAStrategy: %s (allocation %s, rule %s), %d clients, fraction %s, %d rounds, "
                 "round timeout %.0fs", cfg.strategy, self.trainer.allocation, self.trainer.rule_name,
                 cfg.num_clients, cfg.fraction, cfg.rounds, self.round_timeout)

    def global_arrays(self) -> ArrayRecord:
        tensors: dict[str, torch.Tensor] = {}
        for m, (A, B) in self.trainer.global_state.factors.items():
            tensors[f"global/{m}/A"] = A
            tensors[f"global/{m}/B"] = B
        tensors.update({f"head/{k}": v for k, v in self.trainer.global_head.items()})
        return wire.tensors_to_record(tensors)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, *, resume: bool = False, **_unused) -> RunSummary:
        """Run the remaining rounds on ``grid`` with the trainer's loop: metrics, atomic checkpoints after every
        round, ``resume`` from the latest checkpoint in ``output_dir``, peft export at the end.

        ``initial_arrays`` is ignored (the initial adapter comes from the seeded model); ``num_rounds`` overrides
        ``config.rounds``; ``timeout`` overrides ``round_timeout``.
        """
        if num_rounds is not None and num_rounds != self.cfg.rounds:
            self.cfg.rounds = int(num_rounds)
        if timeout is not None:
            self.round_timeout = float(timeout)
        self.summary()
        self.trainer.grid = grid
        summary = self.trainer.run(resume=resume)
        from fedkernels.io import atomic_write_json

        atomic_write_json(self.trainer.out / "flower_bytes.json", self.bytes_log)
        return summary
