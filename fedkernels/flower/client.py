"""`make_client_app`: a Flower ClientApp whose ``train`` handler runs the in-process trainer's local training.

The node rebuilds exactly what the trainer builds (`fedkernels.federated.trainer.prepare`: seeded model,
tokenised data, the same partition) from the `FederatedConfig` the server sends with every message, so a node
needs only the package and the data, no config file. It trains partition ``partition-id`` of its node config
with `fedkernels.federated.client.train_client`, the same function the in-process trainer calls.
"""

from __future__ import annotations

import json
import logging

import torch

from fedkernels.errors import ConfigError
from fedkernels.federated.client import ClientJob, LocalTraining, inject_fault, train_client
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.trainer import Prepared, make_rule, prepare
from fedkernels.flower import wire

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("fedkernels.flower needs Flower: pip install 'fedkernels[flower]'") from exc

__all__ = ["make_client_app", "train_handler", "node_info"]

log = logging.getLogger("fedkernels.flower")

# One prepared model per config, kept while the process lives (a simulation backend worker serves many
# messages; a SuperNode's per-message `flwr-clientapp` process builds it once per message).
_CACHE: dict[str, Prepared] = {}


# the FederatedConfig fields `prepare` reads, plus the strategy (FLoRA rewrites the cached base weights): configs
# equal on these share one prepared model
_PREPARE_KEYS = ("model", "dataset", "seq_len", "max_examples", "seed", "test_fraction", "max_eval", "num_clients",
                 "partition", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "backend", "strategy", "task",
                 "columns")


def _prepared(cfg: FederatedConfig) -> Prepared:
    key = json.dumps({k: getattr(cfg, k) for k in _PREPARE_KEYS}, sort_keys=True)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = prepare(cfg)
    return _CACHE[key]


def node_info(context: Context) -> dict:
    """This node's ``partition-id`` and ``memory-budget`` (if set) from its node config."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ConfigError(f"node config has no partition-id (keys: {sorted(nc)}); start the SuperNode with "
                          "--node-config \"partition-id=<i> memory-budget='<size>'\"")
    out = {"partition-id": int(nc["partition-id"])}
    if "memory-budget" in nc:
        out["memory-budget"] = nc["memory-budget"]
    return out


def train_handler(msg: Message, context: Context) -> Message:
    """Train the client this node holds under the plan in ``msg`` (the task's loss, `Prepared.task`) and reply with
    its factors and head (none for a task without one)."""
    msg_job = wire.decode_train_message(msg.content)
    cid = msg_job["client_id"]
    mine = node_info(context)["partition-id"]
    if cid != mine:
        raise ConfigError(f"node holds partition-id {mine} but was sent client {cid}")
    cfg = FederatedConfig.from_dict(msg_job["federated_config"])
    prep = _prepared(cfg)
    if msg_job["base"]:  # FLoRA (a rule with `mutates_base`): the server merged last round's adapters into the base
        with torch.no_grad():
            for m, w in msg_job["base"].items():
                prep.layers[m].base_layer.weight.copy_(w)
    job = ClientJob(client_id=cid, round_idx=msg_job["round"], plan=msg_job["plan"], start=msg_job["start"],
                    global_factors=msg_job["global"], global_head=msg_job["head"], indices=prep.client_indices[cid],
                    penalty=make_rule(cfg).local_penalty(cid), measure_memory=msg_job["measure_memory"])
    res = train_client(job, on=prep.shared, settings=LocalTraining.from_config(cfg, task=prep.task))
    res = inject_fault(cfg.faults.get(str(cid)), cid, res)  # the same demo/test faults as in-process
    return Message(wire.encode_reply(res), reply_to=msg)


def make_client_app() -> ClientApp:
    """The ClientApp: ``train`` (local training) and ``query`` (node-info: partition-id and memory budget)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_handler(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord(node_info(context))}), reply_to=msg)

    return app
