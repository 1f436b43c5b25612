"""Parallel simulation: several clients of a round trained in ONE forward/backward with `MultiLoRALinear`.

`train_client` runs K clients as K passes over the shared model, each on a ``batch_size`` batch. Here a
group of up to ``FederatedConfig.parallel_clients`` clients shares every pass: each step concatenates the
clients' batches (the very batches `train_client` draws, from `client_order` / `step_indices`), the
encoder runs once with `to_multi_client` layers routing each example to its client's adapter (its
planned ranks, trainable only on its planned modules; unplanned modules carry the global adapter
frozen), the classification head is applied per client with that client's own head copy, and the loss
is the **sum of the clients' mean losses**: rows of client c depend on no other client's parameters
(frozen shared base, per-example attention), so each client's gradient is exactly its own (the argument
of `fedkernels.nn.multi_lora`'s module docstring). Each client then steps its own optimizer (AdamW/SGD,
as in `train_client`) on leaf copies of its planned A/B and head, and the result is copied back into
the stacked adapters. Outputs are the same `ClientResult`s as sequential training (equal to float
rounding when the base model has no dropout; with base dropout > 0 the masks are drawn for the whole
concatenated batch, so the run is deterministic but not mask-for-mask the sequential one).

Not parallelised (trained one at a time by the trainer's sequential path, with the reason logged):
clients whose plan still needs a memory measurement (``measure_memory``: `solvers.memory.measure`
measures one client's step, which a shared pass cannot give), models the multi-client layer refuses
(LoRA dropout, non-prefix rank masks, merged adapters), rules with a client-side loss term (HetLoRA's
``tail_penalty``), heads that are not applied batch-first to one row block per example, and any group
in which something raised: its clients are retrained sequentially, so a faulty client is logged and
excluded exactly as without parallelism.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fedkernels.errors import ConfigError
from fedkernels.federated.client import ClientResult, Factors, client_order, step_indices
from fedkernels.federated.data import TokenizedData
from fedkernels.nn import LoRALinear
from fedkernels.nn.inject import _set_submodule
from fedkernels.nn.multi_lora import MultiClientLoRA, to_multi_client

__all__ = ["ClientJob", "ParallelUnsupportedError", "train_group", "train_clients_parallel"]

log = logging.getLogger("fedkernels.federated")


class ParallelUnsupportedError(ConfigError):
    """The model cannot be simulated multi-client (e.g. its head is not applied batch-first)."""


@dataclass
class ClientJob:
    """One client of a parallel group: its id, plan (module -> rank), start factors and example indices."""

    client_id: int
    plan: dict[str, int]
    start: Factors
    indices: np.ndarray


def _nbytes(factors: Factors) -> int:
    return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B in factors.values())


class _PerClientHead(nn.Module):
    """Stands in for the head during a group pass: rows ``bounds[c]:bounds[c+1]`` go through client c's copy.

    Calls the original head functionally with each client's own tensors, so any head module applied
    batch-first (BERT's ``classifier`` Linear, RoBERTa's dense+out_proj head, GPT-2's per-token ``score``) works.
    """

    def __init__(self, head: nn.Module, bounds: list[int], states: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.inner = head
        self.bounds = bounds
        self.states = states

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != self.bounds[-1]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ParallelUnsupportedError(
                f"the head {type(self.inner).__name__} got input {shape}, not one row per example of the "
                f"{self.bounds[-1]}-example group batch"
            )
        outs = [functional_call(self.inner, self.states[c], (x[lo:hi], *args), kwargs)
                for c, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True))]
        return torch.cat(outs, 0)


def train_group(
    *,
    jobs: Sequence[ClientJob],
    model: nn.Module,
    layers: dict[str, LoRALinear],
    head_name: str,
    global_factors: Factors,
    global_head: dict[str, torch.Tensor],
    data: TokenizedData,
    local_steps: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    seed: int,
    round_idx: int,
) -> list[ClientResult]:
    """Train ``jobs`` together, ``local_steps`` steps of one shared forward/backward each; same outputs as
    calling `train_client` on each job (up to float rounding, without base dropout).

    The model is converted with `to_multi_client` for the duration and restored (original `LoRALinear`
    layers and head back in place) even when something raises. ``wall_s`` of each result is the group's
    wall time divided by the group size.

    Raises:
        ConfigError: the multi-client layer refuses the model (LoRA dropout, rank masks, merged layers).
        ParallelUnsupportedError: the head is not applied batch-first to the group batch.
    """
    t0 = time.perf_counter()
    k = len(jobs)
    head = model.get_submodule(head_name)
    head_param_names = [n for n, _ in head.named_parameters()]
    multi: MultiClientLoRA = to_multi_client(model, k)
    wrapper = None
    try:
        slot_leaves: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        head_states: list[dict[str, torch.Tensor]] = []
        opts: list[torch.optim.Optimizer] = []
        orders: list[np.ndarray] = []
        bytes_down: list[int] = []
        torch_seeds: list[int] = []
        for c, job in enumerate(jobs):
            # what `train_client` does on the single-client layers: every module gets the global adapter at
            # its full rank, frozen; planned modules then take their start (or keep the global factors) at
            # the planned rank and train
            for m, (A, B) in global_factors.items():
                multi.set_client_adapter(c, m, A, B)
                multi.set_client_rank(c, m, min(A.shape[0], layers[m].r))
                multi.set_client_trainable(c, m, False)
            starts = {m: job.start[m] for m in job.plan if m in job.start}
            for m, (A, B) in starts.items():
                multi.set_client_adapter(c, m, A, B)
            for m, r in job.plan.items():
                multi.set_client_rank(c, m, min(r, layers[m].r))
                multi.set_client_trainable(c, m, True)
            bytes_down.append(_nbytes(global_factors) + _nbytes(starts))
            leaves = {m: (multi.modules[m].lora_A[c].detach().clone().requires_grad_(True),
                          multi.modules[m].lora_B[c].detach().clone().requires_grad_(True)) for m in job.plan}
            state = {n: v.detach().clone().requires_grad_(n in head_param_names) for n, v in global_head.items()}
            # same parameter order as `train_client`: planned (A, B) pairs, then the head's parameters
            params = [p for m in job.plan for p in leaves[m]] + [state[n] for n in head_param_names]
            if optimizer == "adamw":
                opts.append(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
            else:
                opts.append(torch.optim.SGD(params, lr=lr, weight_decay=weight_decay))
            slot_leaves.append(leaves)
            head_states.append(state)
            torch_seed, order = client_order(seed, round_idx, job.client_id, job.indices)
            torch_seeds.append(torch_seed)
            orders.append(order)

        bounds = [c * batch_size for c in range(k + 1)]
        ids = torch.arange(k).repeat_interleave(batch_size)
        wrapper = _PerClientHead(head, bounds, head_states)
        _set_submodule(model, head_name, wrapper)
        torch.manual_seed(torch_seeds[0])  # base dropout stream of the group (deterministic in seed, round, group)
        model.train()
        losses: list[list[float]] = [[] for _ in jobs]
        for step in range(local_steps):
            batch = data.batch(np.concatenate([step_indices(o, step, batch_size) for o in orders]))
            multi.zero_grad()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            with multi.clients(ids):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            per_client = [F.cross_entropy(logits[lo:hi], batch["labels"][lo:hi])
                          for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            torch.stack(per_client).sum().backward()
            for c in range(k):
                grads = multi.client_grads(c)
                for m, (A, B) in slot_leaves[c].items():
                    gA, gB = grads[m]
                    A.grad = torch.zeros_like(A) if gA is None else gA.detach().clone()
                    B.grad = torch.zeros_like(B) if gB is None else gB.detach().clone()
                opts[c].step()
                with torch.no_grad():
                    for m, (A, B) in slot_leaves[c].items():
                        multi.modules[m].lora_A[c].copy_(A)
                        multi.modules[m].lora_B[c].copy_(B)
                losses[c].append(float(per_client[c].detach()))
        model.eval()
        wall = (time.perf_counter() - t0) / k
        results = []
        for c, job in enumerate(jobs):
            factors, ranks = {}, {}
            for m in job.plan:
                r = int(multi.modules[m].ranks[c])
                A, B = slot_leaves[c][m]
                factors[m] = (A.detach()[:r].clone(), B.detach()[:, :r].clone())
                ranks[m] = r
            results.append(ClientResult(
                client_id=job.client_id,
                factors=factors,
                ranks=ranks,
                scales={m: layers[m].scale for m in job.plan},
                head={n: v.detach().clone() for n, v in head_states[c].items()},
                num_samples=len(job.indices),
                loss=float(np.mean(losses[c])) if losses[c] else float("nan"),
                measured_bytes=None,
                wall_s=wall,
                bytes_down=bytes_down[c],
                extra={"parallel_group": [j.client_id for j in jobs]},
            ))
        return results
    finally:
        model.eval()
        multi.zero_grad()
        if wrapper is not None:
            _set_submodule(model, head_name, head)
        multi.restore()
        for layer in layers.values():
            layer.trainable = False


def train_clients_parallel(trainer, round_idx: int, sampled: list[int], plans: dict, bar
                           ) -> tuple[list[ClientResult], list[dict], list[dict]]:
    """`FederatedTrainer._train_clients` with groups of up to ``cfg.parallel_clients`` clients per pass.

    Same return value as the sequential method (results, per-client log entries, failures), in sampled
    order. Clients still needing a memory measurement, and every client of a group that raised or that the
    multi-client layer cannot simulate, go through ``trainer._train_clients(..., sequential=True)``.
    """
    cfg = trainer.cfg
    if any(trainer.rule.local_penalty(cid) is not None for cid in sampled):
        log.info("round %d: parallel_clients=%d ignored: the rule adds a client-side loss term (%s)",
                 round_idx, cfg.parallel_clients, trainer.rule)
        return trainer._train_clients(round_idx, sampled, plans, bar, sequential=True)
    if cfg.lora_dropout > 0:
        log.info("round %d: parallel_clients=%d ignored: the multi-client layer has no LoRA dropout (lora_dropout=%r)",
                 round_idx, cfg.parallel_clients, cfg.lora_dropout)
        return trainer._train_clients(round_idx, sampled, plans, bar, sequential=True)
    done: dict[int, tuple[ClientResult | None, dict, dict | None]] = {}

    def sequential(cids: list[int]) -> None:
        res, entries, fails = trainer._train_clients(round_idx, cids, plans, bar, sequential=True)
        by_res = {r.client_id: r for r in res}
        by_fail = {f["client"]: f for f in fails}
        for e in entries:
            done[e["client"]] = (by_res.get(e["client"]), e, by_fail.get(e["client"]))

    pending = []
    for cid in sampled:
        if cfg.measure_memory and not trainer.planner.measured(plans[cid].modules):
            sequential([cid])  # the measurement is one client's own step (memory measurement is sequential-only)
        else:
            pending.append(cid)

    task = bar.add_task(f"round {round_idx} client groups", total=len(pending))
    groups = [pending[i: i + cfg.parallel_clients] for i in range(0, len(pending), cfg.parallel_clients)]
    for group in groups:
        if len(group) == 1:
            sequential(group)
            bar.advance(task)
            continue
        try:
            jobs = [ClientJob(cid, plans[cid].modules,
                              trainer.client_starts.get(cid) or trainer.rule_start(cid, plans[cid].modules),
                              trainer.client_indices[cid]) for cid in group]
            results = train_group(
                jobs=jobs, model=trainer.model, layers=trainer.layers, head_name=trainer.head_name,
                global_factors=trainer.global_state.factors, global_head=trainer.global_head, data=trainer.data,
                local_steps=cfg.local_steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                weight_decay=cfg.weight_decay, seed=cfg.seed, round_idx=round_idx,
            )
        except Exception as exc:  # noqa: BLE001 - retrain the group one by one so the faulty client is isolated
            log.warning("round %d: parallel group %s fell back to sequential training: %s: %s", round_idx, group,
                        type(exc).__name__, exc)
            sequential(group)
            bar.advance(task, len(group))
            continue
        for cid, res in zip(group, results, strict=True):
            plan = plans[cid]
            entry = {"client": cid, "budget": trainer.budgets[cid], "planned_bytes": plan.predicted_bytes,
                     "modules": len(plan.modules), "ranks": sorted(set(plan.modules.values()))}
            try:
                res = trainer._inject_fault(cid, round_idx, res)
                entry.update(status="trained", loss=res.loss, measured_bytes=trainer.planner.measured(plan.modules),
                             wall_s=res.wall_s)
                done[cid] = (res, entry, None)
            except Exception as exc:  # noqa: BLE001 - same isolation as the sequential path
                log.warning("round %d: client %d failed: %s: %s", round_idx, cid, type(exc).__name__, exc)
                reason = f"{type(exc).__name__}: {exc}"
                entry.update(status="failed", reason=reason)
                done[cid] = (None, entry, {"client": cid, "reason": reason})
        bar.advance(task, len(group))
    bar.remove_task(task)
    results_out = [done[c][0] for c in sampled if done[c][0] is not None]
    return results_out, [done[c][1] for c in sampled], [done[c][2] for c in sampled if done[c][2] is not None]
