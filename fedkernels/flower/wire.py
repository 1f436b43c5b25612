"""What travels between the ServerApp and a ClientApp, and the validation of every reply.

Server -> node (``train`` message), a `RecordDict` with
- ``"arrays"`` (ArrayRecord, float32): ``global/<module>/A|B`` for the modules outside the node's plan (frozen,
  they still act in the forward pass), ``start/<module>/A|B`` for the planned modules at their planned rank (what
  the aggregation rule hands this client), ``head/<key>`` for the classification head;
- ``"config"`` (ConfigRecord): ``client-id``, ``round``, ``plan`` (JSON module -> rank), ``measure-memory`` and
  ``federated-config`` (the whole `FederatedConfig` as JSON, so a node needs no config file of its own).

Node -> server (reply): ``"arrays"`` with ``update/<module>/A|B`` (planned modules only) and ``head/<key>``,
``"metrics"`` (MetricRecord: ``num-examples``, ``loss``, ``wall-s``, optional ``measured-bytes``) and ``"config"``
(``client-id``, ``scales`` as JSON). The server checks ``num-examples`` and ``scales`` against what it knows (the
partition it assigned, the plan) and uses its own values: a node cannot weigh its update or rescale it.

Arrays travel as float32: Flower's `Array` converts through ``tensor.numpy()``, which fails on bfloat16
(shared/docs/ecosystem.md sec. 0.4), and the aggregation rules run in float32 anyway.
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np
import torch

from fedkernels.errors import ClientUpdateError
from fedkernels.federated.client import ClientResult

__all__ = [
    "ALLOWED_DTYPES",
    "encode_train_message",
    "decode_train_message",
    "encode_reply",
    "parse_reply",
    "tensors_to_record",
    "record_to_tensors",
    "record_nbytes",
    "reply_nbytes",
]

# fp16 accepted (half the upload), upcast to fp32 before aggregation; anything else (ints, bf16 smuggled as
# raw bytes, float64 doubling the traffic) is rejected.
ALLOWED_DTYPES = ("float32", "float16")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def tensors_to_record(tensors: dict[str, torch.Tensor]):
    """An ArrayRecord of float32 numpy copies (bf16/fp64 tensors are cast: see the module docstring)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().to(torch.float32).cpu().numpy()))
                        for k, v in tensors.items()})


def record_to_tensors(record) -> dict[str, np.ndarray]:
    """The record's arrays as numpy (dtype as sent; callers validate before converting)."""
    return {k: record[k].numpy() for k in record}


def record_nbytes(record) -> int:
    """Bytes of array payload in an ArrayRecord (what the wire carries, headers excluded)."""
    return int(sum(len(record[k].data) for k in record))


def _pairs(prefix: str, factors: Factors) -> dict[str, torch.Tensor]:
    out = {}
    for m, (A, B) in factors.items():
        out[f"{prefix}/{m}/A"] = A
        out[f"{prefix}/{m}/B"] = B
    return out


def encode_train_message(*, client_id: int, round_idx: int, plan: dict[str, int], start: Factors,
                         global_factors: Factors, global_head: dict[str, torch.Tensor], config_json: str,
                         measure_memory: bool, base_weights: dict[str, torch.Tensor] | None = None):
    """RecordDict of a ``train`` message for one client (see the module docstring).

    ``base_weights`` (module -> frozen base weight, as ``base/<module>``) is sent only under FLoRA, whose server
    merges the stacked adapters into the base every round (Wang et al. 2024): the nodes must see that base."""
    from flwr.app import ConfigRecord, RecordDict

    frozen = {m: f for m, f in global_factors.items() if m not in plan}
    starts = {}
    for m, r in plan.items():
        if m in start:
            starts[m] = start[m]
        else:  # the rule gave no start: the global factors truncated to the planned rank (what train_client does)
            A, B = global_factors[m]
            starts[m] = (A[:r], B[:, :r])
    tensors = {**_pairs("global", frozen), **_pairs("start", starts),
               **{f"head/{k}": v for k, v in global_head.items()},
               **{f"base/{m}": w for m, w in (base_weights or {}).items()}}
    config = ConfigRecord({"client-id": int(client_id), "round": int(round_idx),
                           "plan": json.dumps(plan, sort_keys=True), "measure-memory": bool(measure_memory),
                           "federated-config": config_json})
    return RecordDict({"arrays": tensors_to_record(tensors), "config": config})


def decode_train_message(content) -> dict:
    """Inverse of `encode_train_message`: client id, round, plan, frozen global factors, starts, head, config."""
    cfg = content["config"]
    arrays = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in record_to_tensors(content["arrays"]).items()}
    frozen: dict[str, dict[str, torch.Tensor]] = {}
    starts: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    base = {}
    for key, t in arrays.items():
        kind, _, rest = key.partition("/")
        if kind in ("head", "base"):
            (head if kind == "head" else base)[rest] = t
            continue
        module, _, which = rest.rpartition("/")
        (frozen if kind == "global" else starts).setdefault(module, {})[which] = t
    return {
        "client_id": int(cfg["client-id"]),
        "round": int(cfg["round"]),
        "plan": {m: int(r) for m, r in json.loads(str(cfg["plan"])).items()},
        "measure_memory": bool(cfg["measure-memory"]),
        "federated_config": json.loads(str(cfg["federated-config"])),
        "global": {m: (d["A"], d["B"]) for m, d in frozen.items()},
        "start": {m: (d["A"], d["B"]) for m, d in starts.items()},
        "head": head,
        "base": base,
    }


def encode_reply(res: ClientResult):
    """RecordDict of a ``train`` reply carrying a `ClientResult`."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    tensors = {**_pairs("update", res.factors), **{f"head/{k}": v for k, v in res.head.items()}}
    metrics = {"num-examples": int(res.num_samples), "loss": float(res.loss), "wall-s": float(res.wall_s)}
    if res.measured_bytes is not None:
        metrics["measured-bytes"] = int(res.measured_bytes)
    config = ConfigRecord({"client-id": int(res.client_id), "scales": json.dumps(res.scales, sort_keys=True)})
    return RecordDict({"arrays": tensors_to_record(tensors), "metrics": MetricRecord(metrics), "config": config})


def reply_nbytes(message) -> int:
    """Array bytes a reply carried (0 for an error reply or one without an ArrayRecord ``arrays``)."""
    from flwr.app import ArrayRecord

    if message.has_error() or "arrays" not in message.content:
        return 0
    arrays = message.content["arrays"]
    return record_nbytes(arrays) if isinstance(arrays, ArrayRecord) else 0


# A training-memory measurement above 1 EiB (2**60 bytes) is no measurement of any machine: refused.
MAX_MEASURED_BYTES = 2**60


def _bad(msg: str, cid: object, module: str | None, reason: str) -> ClientUpdateError:
    return ClientUpdateError(msg, client=cid, module=module, reason=reason)


def _number(value: object) -> float | None:
    """``value`` as a float if it is a real number (NaN/Inf included), else None: bools, strings and ints too large
    for a float (``10**400`` overflows) are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (OverflowError, ValueError):
        return None


def _finite(value: object) -> float | None:
    """``value`` as a finite float, else None."""
    x = _number(value)
    return x if x is not None and math.isfinite(x) else None


def parse_reply(message, *, client_id: int, plan: dict[str, int], global_factors: Factors,
                global_head: dict[str, torch.Tensor], num_samples: int, scales: dict[str, float]) -> ClientResult:
    """Validate a reply from the node that trained ``client_id`` and turn it into a `ClientResult`.

    The server never takes the weight of an update or its LoRA scale from the node: the result's ``num_samples``
    is ``num_samples`` (the size of the partition the server assigned) and its scales are ``scales`` (module ->
    the plan's scale). The node's own ``num-examples`` and ``scales`` must agree with them exactly, so a node that
    disagrees (misconfigured, or claiming ``10**12`` examples to take over the average) is rejected.

    Checks, before any arithmetic (shared/docs/ecosystem.md sec. 5): not an error reply; the three records are
    there with their types; the reply names the client it was sent for; ``num-examples`` and ``scales`` as above;
    ``loss`` a number, ``wall-s`` finite and >= 0, ``measured-bytes`` (if sent) an integer in 1 .. 2**60; keys
    within the plan and every planned module present; the head's keys exactly the global head's; shapes
    ``A [plan rank, in]``, ``B [out, plan rank]``, head as the global head; dtype in `ALLOWED_DTYPES`; finite values.
    Raises `ClientUpdateError` (with ``client``, ``module``, ``reason``) on the first problem found; any value
    of any type only ever raises that. The aggregation rule validates the factors once more.
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    cid = client_id
    if message.has_error():
        err = message.error
        raise _bad(f"client {cid}: error reply from its node (code {err.code}): {err.reason}", cid, None, "error_reply")
    content = message.content
    for name, kind in (("arrays", ArrayRecord), ("metrics", MetricRecord), ("config", ConfigRecord)):
        if name not in content or not isinstance(content[name], kind):
            raise _bad(f"client {cid}: reply has no {kind.__name__} {name!r}", cid, None, "malformed")
    cfg, metrics = content["config"], content["metrics"]
    sent_cid = cfg.get("client-id")
    if sent_cid != cid:
        raise _bad(f"client {cid}: reply claims client id {sent_cid!r}", cid, None, "client_id")
    n = metrics.get("num-examples")
    if _finite(n) != float(num_samples):
        raise _bad(f"client {cid}: num-examples {n!r} is not the {num_samples} examples of its partition", cid,
                   None, "num_samples")
    try:
        sent_scales = {str(k): v for k, v in json.loads(str(cfg.get("scales", "{}"))).items()}
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise _bad(f"client {cid}: scales are not a JSON object: {str(cfg.get('scales'))[:80]!r}", cid, None,
                   "malformed") from None
    loss = metrics.get("loss", float("nan"))
    if _number(loss) is None:
        raise _bad(f"client {cid}: loss must be a number, got {loss!r}", cid, None, "malformed")
    wall = metrics.get("wall-s", 0.0)
    if _finite(wall) is None or _finite(wall) < 0:
        raise _bad(f"client {cid}: wall-s must be a finite number >= 0, got {wall!r}", cid, None, "malformed")
    measured = metrics.get("measured-bytes")
    if measured is not None:
        mb = _finite(measured)
        if mb is None or not mb.is_integer() or not 0 < mb <= MAX_MEASURED_BYTES:
            raise _bad(f"client {cid}: measured-bytes must be an integer in 1 .. {MAX_MEASURED_BYTES}, got "
                       f"{measured!r}", cid, None, "measured_bytes")

    try:
        arrays = record_to_tensors(content["arrays"])
    except Exception as exc:  # noqa: BLE001 - a forged Array (bad dtype string, shape, bytes) is one bad reply
        raise _bad(f"client {cid}: arrays cannot be read: {type(exc).__name__}: {exc}", cid, None,
                   "malformed") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    for key in sorted(arrays):
        kind, _, rest = key.partition("/")
        module, _, which = rest.rpartition("/")
        if kind == "head":
            if rest not in global_head:
                raise _bad(f"client {cid}: unknown head key {rest!r}", cid, None, "unknown_key")
            head[rest] = arrays[key]
        elif kind == "update" and which in ("A", "B"):
            if module not in global_factors:
                raise _bad(f"client {cid}: unknown module {module!r}", cid, module, "unknown_module")
            if module not in plan:
                raise _bad(f"client {cid}: module {module!r} was not in its plan (planned: {sorted(plan)})", cid,
                           module, "unplanned_module")
            parts.setdefault(module, {})[which] = arrays[key]
        else:
            raise _bad(f"client {cid}: unexpected array key {key!r}", cid, None, "unknown_key")
    for m, r in sorted(plan.items()):
        got = parts.get(m, {})
        if set(got) != {"A", "B"}:
            raise _bad(f"client {cid}: planned module {m!r} (rank {r}) is missing from the reply", cid, m,
                       "missing_module")
    missing_head = sorted(set(global_head) - set(head))
    if missing_head:
        raise _bad(f"client {cid}: head keys {missing_head} missing from the reply", cid, None, "missing_module")

    def check(name: str, module: str | None, a: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        if a.dtype.name not in ALLOWED_DTYPES:
            raise _bad(f"client {cid}: {name} has dtype {a.dtype.name}, allowed: {', '.join(ALLOWED_DTYPES)}", cid,
                       module, "dtype")
        if tuple(a.shape) != shape:
            raise _bad(f"client {cid}: {name} has shape {tuple(a.shape)}, expected {shape}", cid, module, "shape")
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise _bad(f"client {cid}: {name} has {bad} non-finite (NaN/Inf) entries", cid, module, "non_finite")
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    factors: Factors = {}
    for m in sorted(plan):
        r = plan[m]
        gA, gB = global_factors[m]
        A = check(f"module {m!r} A", m, parts[m]["A"], (r, gA.shape[1]))
        B = check(f"module {m!r} B", m, parts[m]["B"], (gB.shape[0], r))
        s = sent_scales.get(m)
        if _finite(s) != float(scales[m]):
            raise _bad(f"client {cid}, module {m!r}: LoRA scale {s!r} is not the plan's {scales[m]!r}", cid, m,
                       "scale")
        factors[m] = (A.to(gA.dtype), B.to(gB.dtype))
    head_t = {k: check(f"head {k!r}", None, head[k], tuple(v.shape)).to(v.dtype) for k, v in global_head.items()}
    return ClientResult(
        client_id=cid,
        factors=factors,
        ranks={m: plan[m] for m in plan},
        scales={m: float(scales[m]) for m in plan},
        head=head_t,
        num_samples=int(num_samples),
        loss=float(loss),
        measured_bytes=int(measured) if measured is not None else None,
        wall_s=float(wall),
    )
