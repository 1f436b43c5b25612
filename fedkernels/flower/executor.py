"""`FlowerExecutor`: the `ClientExecutor` of a Flower federation: nodes report budgets, train rounds, reply.

- Nodes are clients: each SuperNode says, through a ``query`` message, which ``partition-id`` it holds and its
  ``memory-budget`` (both from its ``--node-config``). A node whose config is bad (no integer partition-id in
  range; a budget that is NaN, negative, unparsable or above `MAX_BUDGET`) or whose budget no plan fits is
  excluded, with a warning naming it; its partition then has no node and fails each round it is sampled.
- When several nodes claim one partition, the lowest node id among those online is chosen, for the budget the
  round is planned with and for the message alike (logged once per set of claimants).
- `messages` builds one ``train`` message per sampled client (`fedkernels.flower.wire`), `collect` validates
  the replies (`wire.parse_reply`: the weight of an update is the size of the partition the server assigned and
  its LoRA scale the plan's, never what the node says) and returns a `RoundOutcome`; error replies, silent
  nodes and bad replies are logged and excluded, one reply at a time; nothing a node sends raises out of here.
- `train` is both halves around one ``grid.send_and_receive`` (the trainer's own loop); `HeteroLoRAStrategy` calls
  the halves from Flower's ``configure_train`` / ``aggregate_train``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedkernels.errors import ClientUpdateError, ConfigError
from fedkernels.federated.client import ClientResult
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.executor import ClientExecutor, Progress, RoundJob, RoundOutcome
from fedkernels.flower import wire

try:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import Grid
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("fedkernels.flower needs Flower: pip install 'fedkernels[flower]'") from exc

__all__ = ["FlowerExecutor", "NodeInfo", "parse_budget", "MAX_BUDGET", "QUERY_NODE_INFO"]

log = logging.getLogger("fedkernels.flower")

QUERY_NODE_INFO = "node-info"
# A node budget above 1 EiB (2**60 bytes, ~10^6 times today's largest accelerator memory) is a typo or a forgery;
# refusing it also keeps every budget a float can hold exactly enough for the solvers.
MAX_BUDGET = 2**60


@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    budget: int | None  # bytes; None: the node did not say, the config's budget for its partition is used


@dataclass
class _Pending:
    """What the server sent in one round, to check the replies against."""

    node_of: dict[int, int]  # client id -> node id
    bytes_down: dict[int, int]  # client id -> array bytes sent
    client_log: dict[int, dict]
    failures: list[dict] = field(default_factory=list)


def parse_budget(value: object, node_id: int) -> int | None:
    """``memory-budget`` from a node config: bytes as an int, or a size such as ``"6GiB"``; absent: None.

    Raises `ConfigError` naming the node and the value for anything else: a bool, NaN/Inf, a negative amount, an
    unparsable string, zero, or more than `MAX_BUDGET`."""
    if value is None or value == "":
        return None
    import solvers

    bad = f"node {node_id}: memory-budget must be a positive number of bytes or a size like '6GiB', got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(bad)
    try:
        nbytes = int(solvers.parse_bytes(value))
    except (ValueError, OverflowError) as exc:  # BudgetParseError is a ValueError; "1e308TiB" overflows
        raise ConfigError(f"{bad} ({exc})") from None
    if not 0 < nbytes <= MAX_BUDGET:
        raise ConfigError(f"{bad} (outside 1 B .. {MAX_BUDGET} B)")
    return nbytes


class FlowerExecutor(ClientExecutor):
    """Local training on Flower SuperNodes (see the module docstring).

    Args:
        config: the run (sent to the nodes with every message, so a node needs no config file).
        round_timeout: seconds to wait for train replies; nodes silent by then count as failed.
        min_nodes: connected nodes to wait for before the first round.
        node_wait_s: how long to wait for them before giving up with `ConfigError`.
        query_timeout: seconds to wait for the node-info replies.
    """

    def __init__(self, config: FederatedConfig, *, round_timeout: float = 600.0, min_nodes: int = 1,
                 node_wait_s: float = 300.0, query_timeout: float = 120.0) -> None:
        for name, v in (("round_timeout", round_timeout), ("node_wait_s", node_wait_s),
                        ("query_timeout", query_timeout)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ConfigError(f"min_nodes must be an integer >= 0, got {min_nodes!r}")
        self.num_clients = config.num_clients
        self.round_timeout = float(round_timeout)
        self.min_nodes = min_nodes
        self.node_wait_s = float(node_wait_s)
        self.query_timeout = float(query_timeout)
        self.grid: Grid | None = None
        self.nodes: dict[int, NodeInfo] = {}
        self.excluded: dict[int, str] = {}  # node id -> why it takes no part
        self.bytes_log: list[dict] = []  # per round: array bytes down/up on the wire
        self._queried: set[int] = set()
        self._chosen: tuple[int, dict[int, int]] | None = None  # (round, partition -> node) of the last planning
        self._claims_logged: set[tuple[int, ...]] = set()
        self._pending: dict[int, _Pending] = {}
        self._config_json = json.dumps(config.to_dict(), sort_keys=True)

    def bind(self, grid: Grid) -> None:
        """Send through ``grid`` from now on."""
        self.grid = grid

    def _grid(self) -> Grid:
        if self.grid is None:
            raise ConfigError("FlowerExecutor has no grid: bind(grid) first (HeteroLoRAStrategy.start does)")
        return self.grid

    # ------------------------------------------------------------------ nodes
    def register_node(self, node_id: int, node_config: dict,
                      check: Callable[[dict[int, int]], None] | None = None) -> NodeInfo | None:
        """Record a node's ``partition-id`` and ``memory-budget``; None (and a warning) when the node is excluded:
        a bad config, or a budget ``check`` refuses (`solvers.errors.InfeasibleBudgetError`)."""
        from solvers.errors import InfeasibleBudgetError

        try:
            pid = node_config.get("partition-id")
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < self.num_clients:
                raise ConfigError(f"node {node_id}: partition-id must be an integer in [0, {self.num_clients}), "
                                  f"got {pid!r}")
            budget = parse_budget(node_config.get("memory-budget"), node_id)
            if budget is not None and check is not None:
                check({pid: budget})
        except (ConfigError, InfeasibleBudgetError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("node %d excluded: %s", node_id, reason)
            self.excluded[int(node_id)] = reason
            self.nodes.pop(int(node_id), None)
            return None
        info = NodeInfo(int(node_id), pid, budget)
        self.nodes[int(node_id)] = info
        self.excluded.pop(int(node_id), None)
        return info

    def discover(self, check: Callable[[dict[int, int]], None] | None = None) -> None:
        """Wait for ``min_nodes`` nodes (first call), then ask every node not yet seen for its node config."""
        grid = self._grid()
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
        self._queried.update(new)
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            nid = reply.metadata.src_node_id
            if nid not in new:
                log.warning("node %d: node-info reply without a query: ignored", nid)
                continue
            if reply.has_error():
                log.warning("node %d: node-info query failed: %s", nid, reply.error.reason)
                continue
            try:
                node_config = dict(reply.content["config"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("node %d excluded: node-info reply has no config record (%s)", nid, exc)
                self.excluded[nid] = "node-info reply has no config record"
                continue
            self.register_node(nid, node_config, check)
        log.info("nodes: %s", {n: (i.partition_id, i.budget) for n, i in sorted(self.nodes.items())})

    def node_for(self, client_id: int, online: set[int] | None = None) -> int | None:
        """The node holding partition ``client_id`` among ``online``: the lowest node id when several claim it."""
        ids = sorted(n for n, i in self.nodes.items() if i.partition_id == client_id
                     and (online is None or n in online))
        if len(ids) > 1 and tuple(ids) not in self._claims_logged:
            self._claims_logged.add(tuple(ids))
            log.warning("partition-id %d is claimed by nodes %s: node %d (lowest id) gets its messages and gives "
                        "its budget", client_id, ids, ids[0])
        return ids[0] if ids else None

    def _assignment(self) -> dict[int, int]:
        online = set(self._grid().get_node_ids())
        out = {}
        for pid in range(self.num_clients):
            node = self.node_for(pid, online)
            if node is not None:
                out[pid] = node
        return out

    def round_budgets(self, round_idx: int, configured: dict[int, int],
                      check: Callable[[dict[int, int]], None]) -> dict[int, int]:
        """Discover new nodes, choose one node per partition, and return the budgets: the chosen node's where it
        reported one, the configured one otherwise. The round's messages go to the same chosen nodes."""
        self.discover(check)
        chosen = self._assignment()
        self._chosen = (round_idx, chosen)
        budgets = dict(configured)
        for pid, node in chosen.items():
            if self.nodes[node].budget is not None:
                budgets[pid] = self.nodes[node].budget
        return budgets

    # ------------------------------------------------------------------ one round, in two halves
    def messages(self, job: RoundJob) -> list[Message]:
        """One ``train`` message per sampled client that has a node; the others are recorded as failed."""
        chosen = self._chosen[1] if self._chosen is not None and self._chosen[0] == job.round_idx \
            else self._assignment()
        pending = _Pending({}, {}, {})
        messages = []
        for cid in job.sampled:
            entry = job.entry(cid)
            pending.client_log[cid] = entry
            node = chosen.get(cid)
            if node is None:
                reason = f"no SuperNode holds partition-id {cid}"
                log.warning("round %d: client %d failed: %s", job.round_idx, cid, reason)
                pending.failures.append({"client": cid, "reason": reason})
                entry.update(status="failed", reason=reason)
                continue
            content = wire.encode_train_message(
                client_id=cid, round_idx=job.round_idx, plan=job.plans[cid].modules, start=job.starts[cid],
                global_factors=job.global_factors, global_head=job.global_head, config_json=self._config_json,
                measure_memory=cid in job.measure, base_weights=job.base_weights)
            pending.node_of[cid] = node
            pending.bytes_down[cid] = wire.record_nbytes(content["arrays"])
            entry["node"] = node
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(job.round_idx)))
        self._pending[job.round_idx] = pending
        return messages

    def collect(self, job: RoundJob, replies: Iterable[Message], waited_s: float | None = None) -> RoundOutcome:
        """Validate the replies to `messages` of ``job``; bad ones are logged and excluded, one reply at a time."""
        pending = self._pending.pop(job.round_idx)
        client_of = {n: c for c, n in pending.node_of.items()}
        out = RoundOutcome(failures=list(pending.failures))
        results: dict[int, ClientResult] = {}
        seen: set[int] = set()
        bytes_up = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = client_of.get(node)
            if cid is None:
                log.warning("round %d: reply from node %d, which was sent nothing: ignored", job.round_idx, node)
                continue
            entry = pending.client_log[cid]
            if cid in seen:  # keep neither: "the first" would depend on arrival order
                results.pop(cid, None)
                out.measurements.pop(cid, None)
                self._fail(job.round_idx, cid, "node sent more than one reply", entry, out, "rejected")
                continue
            seen.add(cid)
            try:
                bytes_up += wire.reply_nbytes(reply)
                res = wire.parse_reply(reply, client_id=cid, plan=job.plans[cid].modules,
                                       global_factors=job.global_factors, global_head=job.global_head,
                                       num_samples=len(job.indices[cid]), scales=job.scales)
            except ClientUpdateError as exc:
                status = "failed" if exc.reason == "error_reply" else "rejected"
                self._fail(job.round_idx, cid, str(exc), entry, out, status, module=exc.module)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a node sends, only its own reply is lost
                self._fail(job.round_idx, cid, f"malformed reply: {type(exc).__name__}: {exc}", entry, out,
                           "rejected")
                continue
            res.bytes_down = pending.bytes_down[cid]
            if res.measured_bytes is not None and cid in job.measure:  # only the measurement the server asked for
                out.measurements[cid] = res.measured_bytes
            entry.update(status="trained", loss=res.loss, wall_s=res.wall_s)
            results[cid] = res
        for cid, node in pending.node_of.items():
            if cid not in seen:
                # the SuperLink may give up on a node it sees die before the timeout
                waited = f"after {waited_s:.0f}s" if waited_s is not None else "by the deadline"
                reason = f"no reply from node {node} {waited} (round timeout {self.round_timeout:.0f}s)"
                self._fail(job.round_idx, cid, reason, pending.client_log[cid], out, "failed")
        self.bytes_log.append({"round": job.round_idx, "bytes_down": int(sum(pending.bytes_down.values())),
                               "bytes_up": int(bytes_up)})
        out.results = [results[c] for c in job.sampled if c in results]
        out.client_log = [pending.client_log[c] for c in job.sampled]
        return out

    @staticmethod
    def _fail(round_idx: int, cid: int, reason: str, entry: dict, out: RoundOutcome, status: str,
              module: str | None = None) -> None:
        log.warning("round %d: client %d %s: %s", round_idx, cid, status, reason)
        item = {"client": cid, "reason": reason}
        if module is not None:
            item["module"] = module
        out.failures.append(item)
        entry.update(status=status, reason=reason)

    def train(self, job: RoundJob, progress: Progress | None = None) -> RoundOutcome:
        """`messages`, one ``send_and_receive`` round trip (``round_timeout``), `collect`."""
        messages = self.messages(job)
        t = time.monotonic()
        replies = list(self._grid().send_and_receive(messages, timeout=self.round_timeout)) if messages else []
        out = self.collect(job, replies, waited_s=time.monotonic() - t)
        if progress is not None:
            progress(len(job.sampled))
        return out
