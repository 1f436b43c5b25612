"""Local training of one simulated client on the shared model, under its plan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from fedkernels.federated.data import TokenizedData, rng_for
from fedkernels.federated.instruct import InstructionData
from fedkernels.federated.tasks import Task
from fedkernels.nn import LoRALinear

__all__ = ["ClientJob", "ClientResult", "LocalTraining", "SharedModel", "client_order",
           "load_adapter_state", "step_indices", "train_client", "count_training_bytes", "inject_fault",
           "fault_injector"]

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ClientResult:
    """What a client sends back: its trained factors (planned modules, at its ranks) and head (empty when the task
    trains none, `Task.trains_head`)."""

    client_id: int
    factors: Factors
    ranks: dict[str, int]
    scales: dict[str, float]
    head: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    measured_bytes: int | None = None
    wall_s: float = 0.0
    bytes_down: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def bytes_up(self) -> int:
        n = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())
        return n + sum(t.numel() * t.element_size() for t in self.head.values())


@torch.no_grad()
def load_adapter_state(layers: dict[str, LoRALinear], state: Factors, ranks: dict[str, int] | None = None) -> int:
    """Copy factors into the layers (first r ranks; the rest zeroed) and set each active rank.

    Returns the bytes loaded (what a client downloads).
    """
    nbytes = 0
    for name, (A, B) in state.items():
        layer = layers[name]
        r = A.shape[0] if ranks is None else ranks.get(name, A.shape[0])
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        layer.lora_A[: A.shape[0]].copy_(A)
        layer.lora_B[:, : B.shape[1]].copy_(B)
        layer.set_active_rank(min(r, layer.r))
        nbytes += A.numel() * A.element_size() + B.numel() * B.element_size()
    return nbytes


def count_training_bytes(model: nn.Module, batch: dict, params: list[nn.Parameter], loss_fn,
                         optimizer: str = "adamw") -> int:
    """Allocator peak of one training step, measured by `solvers.measure.measure_peak` (the memory model's yardstick).

    Forward, backward and the optimizer step on ``batch`` with the gradients and optimizer states of the
    trainer's steady state alive (CPU: torch.profiler memory events; CUDA: ``max_memory_allocated``), plus
    every parameter and buffer; everything is restored afterwards. Logged as ``measured_bytes`` next to
    the plan's predicted peak ``planned_bytes``.
    """
    from solvers.measure import measure_peak

    return int(measure_peak(model, batch, params, loss_fn=loss_fn, optimizer=optimizer).peak_bytes)


def client_order(seed: int, round_idx: int, client_id: int, indices: np.ndarray) -> tuple[int, np.ndarray]:
    """(torch seed for dropout streams, permuted example order) of one client's local training in a round.

    Derived from (seed, round, client) only, so the sequential and the parallel (`fedkernels.federated.parallel`)
    simulations draw exactly the same batches.
    """
    rng = rng_for(seed, round_idx, client_id, 0xC11E)
    torch_seed = int(rng.integers(2**62))
    return torch_seed, rng.permutation(indices)


def step_indices(order: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Example indices of local step ``step``: consecutive ``batch_size`` slices of ``order``, wrapping around."""
    lo = (step * batch_size) % len(order)
    return np.take(order, range(lo, lo + batch_size), mode="wrap")


LossFn = Callable[[nn.Module, dict], torch.Tensor]
Penalty = Callable[[Factors], torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    """How every client trains locally: ``local_steps`` optimizer steps of ``batch_size`` examples with
    ``optimizer`` (``adamw`` | ``sgd``) at ``lr`` / ``weight_decay``; batch order and dropout derive from ``seed``.
    ``task`` (`fedkernels.federated.tasks.Task`) gives the loss: ``loss_fn(model, batch)`` for a client's own pass,
    ``task.loss_from_logits`` for a pass shared by several clients."""

    local_steps: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    seed: int
    task: Task

    @classmethod
    def from_config(cls, cfg, task: Task | None = None) -> LocalTraining:
        """The settings of a `FederatedConfig` (built once per run, shared by every client and engine); ``task``:
        the run's task (`Prepared.task`), default `task_from_config` (which needs ``cfg.task`` set)."""
        if task is None:
            from fedkernels.federated.tasks import task_from_config

            task = task_from_config(cfg)
        return cls(local_steps=cfg.local_steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, seed=cfg.seed, task=task)

    @property
    def loss_fn(self) -> LossFn:
        """``loss(model, batch) -> scalar``: the task's training loss."""
        return self.task.loss

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class SharedModel:
    """The model simulated clients train in turn (in-process) or a node trains (Flower): the model, its LoRA
    layers, the name of its trained head (None: the task trains none, e.g. a causal LM's frozen LM head) and the
    tokenised data the clients' indices point into."""

    model: nn.Module
    layers: dict[str, LoRALinear]
    head_name: str | None
    data: TokenizedData | InstructionData

    @property
    def head(self) -> nn.Module | None:
        return None if self.head_name is None else self.model.get_submodule(self.head_name)


@dataclass
class ClientJob:
    """Everything one client needs for one round: its plan (module -> rank), start factors of the planned modules,
    the global adapter and head it downloads, its example indices, the rule's loss term (``penalty``) and whether
    to measure its training memory."""

    client_id: int
    round_idx: int
    plan: dict[str, int]
    start: Factors
    global_factors: Factors
    global_head: dict[str, torch.Tensor]
    indices: np.ndarray
    penalty: Penalty | None = None
    measure_memory: bool = False


def train_client(job: ClientJob, *, on: SharedModel, settings: LocalTraining) -> ClientResult:
    """Train ``job.client_id`` for ``settings.local_steps`` steps on its indices under its plan, on ``on``'s model.

    Modules outside the plan carry the global adapter frozen (they still act in forward); planned modules
    start from ``job.start`` (what the aggregation rule hands this client) at their planned rank and train.
    Randomness (batch order, dropout) derives from (seed, round, client): resuming needs no RNG pickles.
    ``job.penalty`` (from the rule's `local_penalty`, e.g. HetLoRA's tail norm) is added to every step's loss as a
    function of the planned modules' live factors; the reported loss is the task loss alone.
    """
    t0 = time.perf_counter()
    layers, head, plan, start = on.layers, on.head, job.plan, job.start
    bytes_down = load_adapter_state(layers, job.global_factors)
    for layer in layers.values():
        layer.trainable = False
    bytes_down += load_adapter_state(layers, {m: start[m] for m in plan if m in start}, plan)
    for m, r in plan.items():
        if m not in start:  # no start given: the global factors truncated to the planned rank
            layers[m].set_active_rank(min(r, layers[m].r))
        layers[m].trainable = True
    head_params: list[nn.Parameter] = []
    if head is not None:
        head.load_state_dict(job.global_head)
        head_params = list(head.parameters())
        for p in head_params:
            p.requires_grad_(True)
    params = [p for m in plan for p in (layers[m].lora_A, layers[m].lora_B)] + head_params
    opt = settings.make_optimizer(params)

    torch_seed, order = client_order(settings.seed, job.round_idx, job.client_id, job.indices)
    torch.manual_seed(torch_seed)  # base dropout / LoRA dropout streams
    model, loss_fn = on.model, settings.loss_fn
    model.train()
    losses = []
    measured = None
    for step in range(settings.local_steps):
        batch = on.data.batch(step_indices(order, step, settings.batch_size))
        if job.measure_memory and step == 0:
            measured = count_training_bytes(model, batch, params, loss_fn, settings.optimizer)
        loss = loss_fn(model, batch)
        total = loss
        if job.penalty is not None:
            live = {m: (layers[m].lora_A[:layers[m].active_rank], layers[m].lora_B[:, :layers[m].active_rank])
                    for m in plan}
            total = loss + job.penalty(live)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    factors = {}
    ranks = {}
    for m in plan:
        layer = layers[m]
        r = layer.active_rank
        factors[m] = (layer.lora_A.detach()[:r].clone(), layer.lora_B.detach()[:, :r].clone())
        ranks[m] = r
        layer.trainable = False
    head_state = {} if head is None else {k: v.detach().clone() for k, v in head.state_dict().items()}
    return ClientResult(
        client_id=job.client_id,
        factors=factors,
        ranks=ranks,
        scales={m: layers[m].scale for m in plan},
        head=head_state,
        num_samples=len(job.indices),
        loss=float(np.mean(losses)) if losses else float("nan"),
        measured_bytes=measured,
        wall_s=time.perf_counter() - t0,
        bytes_down=bytes_down,
    )


def inject_fault(kind: str | None, cid: int, res: ClientResult) -> ClientResult:
    """Fault injection for tests and demos (``FederatedConfig.faults``): ``raise`` crashes the client, ``nan``
    poisons one entry of its first B, ``shape`` drops a column of its first A. Shared by the in-process trainer
    and the Flower ClientApp, so both engines see the same bad clients."""
    if kind == "raise":
        raise RuntimeError(f"injected fault: client {cid} crashed")
    if kind == "nan" and res.factors:
        m = next(iter(res.factors))
        A, B = res.factors[m]
        B = B.clone()
        B.view(-1)[0] = float("nan")
        res.factors[m] = (A, B)
    if kind == "shape" and res.factors:
        m = next(iter(res.factors))
        A, B = res.factors[m]
        res.factors[m] = (A[:, :-1].clone(), B)
    return res


FaultFn = Callable[[int, ClientResult], ClientResult]


def fault_injector(faults: dict[str, str], round_idx: int,
                   hook: Callable[[int, int, ClientResult], ClientResult] | None = None) -> FaultFn:
    """``inject(client_id, result) -> result`` for one round: the config's ``faults`` (`inject_fault`), then
    ``hook(client_id, round_idx, result)`` (tests simulating bad clients; raising in it = a crashing client)."""

    def inject(cid: int, res: ClientResult) -> ClientResult:
        res = inject_fault(faults.get(str(cid)), cid, res)
        return hook(cid, round_idx, res) if hook is not None else res

    return inject
