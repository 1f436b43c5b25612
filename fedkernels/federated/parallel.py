"""Parallel simulation: several clients of a round trained in ONE forward/backward with `MultiLoRALinear`.

`train_client` runs K clients as K passes over the shared model, each on a ``batch_size`` batch. Here a
group of up to ``FederatedConfig.parallel_clients`` clients shares every pass: each step concatenates the
clients' batches (the very batches `train_client` draws, from `client_order` / `step_indices`), the
encoder runs once with `to_multi_client` layers routing each example to its client's adapter (its
planned ranks, trainable only on its planned modules; unplanned modules carry the global adapter frozen), a
trained head (classification) is applied per client with that client's own head copy, and the loss is the
**sum of the clients' mean losses** (the task's `loss_from_logits` on each client's rows): rows of client c
depend on no other client's parameters (frozen shared base, per-example attention), so each client's gradient
is exactly its own (the argument
of `fedkernels.nn.multi_lora`'s module docstring). Each client then steps its own optimizer (AdamW/SGD,
as in `train_client`) on leaf copies of its planned A/B and head, and the result is copied back into
the stacked adapters. Outputs are the same `ClientResult`s as sequential training (equal to float
rounding when the base model has no dropout; with base dropout > 0 the masks are drawn for the whole
concatenated batch, so the run is deterministic but not mask-for-mask the sequential one).

Not parallelised (trained one at a time by `SequentialExecutor`, with the reason logged; the dispatch is
`fedkernels.federated.executor.ParallelExecutor`):
clients whose plan still needs a memory measurement (``measure_memory``: `solvers.memory.measure`
measures one client's step, which a shared pass cannot give), models the multi-client layer refuses
(LoRA dropout, non-prefix rank masks, merged adapters), rules with a client-side loss term (HetLoRA's
``tail_penalty``), heads that are not applied batch-first to one row block per example, and any group
in which something raised: its clients are retrained sequentially, so a faulty client is logged and
excluded exactly as without parallelism.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from fedkernels.errors import ConfigError
from fedkernels.federated.client import (
    ClientJob,
    ClientResult,
    Factors,
    LocalTraining,
    SharedModel,
    client_order,
    step_indices,
)
from fedkernels.nn.inject import _set_submodule
from fedkernels.nn.multi_lora import MultiClientLoRA, to_multi_client

__all__ = ["ParallelUnsupportedError", "train_group"]


class ParallelUnsupportedError(ConfigError):
    """The model cannot be simulated multi-client (e.g. its head is not applied batch-first)."""


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


def train_group(jobs: Sequence[ClientJob], *, on: SharedModel, settings: LocalTraining) -> list[ClientResult]:
    """Train ``jobs`` together, ``settings.local_steps`` steps of one shared forward/backward each; same outputs as
    `train_client` on each job (up to float rounding, without base dropout).

    The model is converted with `to_multi_client` for the duration and restored (original `LoRALinear`
    layers and head back in place) even when something raises. ``wall_s`` of each result is the group's
    wall time divided by the group size. The jobs' ``penalty`` and ``measure_memory`` must be unset (the caller
    trains those clients alone).

    Raises:
        ConfigError: the multi-client layer refuses the model (LoRA dropout, rank masks, merged layers).
        ParallelUnsupportedError: the head is not applied batch-first to the group batch, or a job has a penalty
            or asks for a memory measurement.
    """
    t0 = time.perf_counter()
    for job in jobs:
        if job.penalty is not None or job.measure_memory:
            raise ParallelUnsupportedError(f"client {job.client_id}: a loss term or a memory measurement is one "
                                           "client's own pass; train it alone")
    k = len(jobs)
    model, layers, head_name, bs = on.model, on.layers, on.head_name, settings.batch_size
    head = on.head  # None: the task trains no head (a causal LM's LM head is frozen and shared)
    head_param_names = [] if head is None else [n for n, _ in head.named_parameters()]
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
            for m, (A, B) in job.global_factors.items():
                multi.set_client_adapter(c, m, A, B)
                multi.set_client_rank(c, m, min(A.shape[0], layers[m].r))
                multi.set_client_trainable(c, m, False)
            starts = {m: job.start[m] for m in job.plan if m in job.start}
            for m, (A, B) in starts.items():
                multi.set_client_adapter(c, m, A, B)
            for m, r in job.plan.items():
                multi.set_client_rank(c, m, min(r, layers[m].r))
                multi.set_client_trainable(c, m, True)
            bytes_down.append(_nbytes(job.global_factors) + _nbytes(starts))
            leaves = {m: (multi.modules[m].lora_A[c].detach().clone().requires_grad_(True),
                          multi.modules[m].lora_B[c].detach().clone().requires_grad_(True)) for m in job.plan}
            state = {n: v.detach().clone().requires_grad_(n in head_param_names) for n, v in job.global_head.items()}
            # same parameter order as `train_client`: planned (A, B) pairs, then the head's parameters
            opts.append(settings.make_optimizer([p for m in job.plan for p in leaves[m]]
                                                + [state[n] for n in head_param_names]))
            slot_leaves.append(leaves)
            head_states.append(state)
            torch_seed, order = client_order(settings.seed, job.round_idx, job.client_id, job.indices)
            torch_seeds.append(torch_seed)
            orders.append(order)

        bounds = [c * bs for c in range(k + 1)]
        ids = torch.arange(k).repeat_interleave(bs)
        if head is not None:
            wrapper = _PerClientHead(head, bounds, head_states)
            _set_submodule(model, head_name, wrapper)
        torch.manual_seed(torch_seeds[0])  # base dropout stream of the group (deterministic in seed, round, group)
        model.train()
        losses: list[list[float]] = [[] for _ in jobs]
        for step in range(settings.local_steps):
            batch = on.data.batch(np.concatenate([step_indices(o, step, bs) for o in orders]))
            multi.zero_grad()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            with multi.clients(ids):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # the loss is the sum of the clients' own losses, each the task's loss on its rows of the pass
            per_client = []
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                rows = {key: v[lo:hi] for key, v in batch.items()}
                per_client.append(settings.task.loss_from_logits(logits[lo:hi], rows))
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
