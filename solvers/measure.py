"""Measurement of one training step's memory on a real torch model (the yardstick of the memory model).

Two numbers per step (`measure`):

* the saved-tensor count: saved-for-backward bytes (``torch.autograd.graph.saved_tensors_hooks``, each
  storage once, parameter storages excluded) + every parameter and buffer + a gradient and the optimizer
  states per trainable parameter. This is what the memory model's additive terms add up to.
* with ``peak=True``, the allocator-level peak of the step as the trainer runs it (fedkernels'
  `train_client`, steady state from its second local step on): gradients of the previous step and the
  optimizer states exist when the forward starts; ``zero_grad(set_to_none=True)``; backward; optimizer step.
  On CPU the peak is read from the allocation and free events of ``torch.profiler`` (``profile_memory``),
  summed in time order; on CUDA from ``torch.cuda.max_memory_allocated`` (``memory_reserved`` is reported
  too: what the caching allocator holds from the driver). The peak counts every byte allocated during the
  step plus what existed before it for training (parameters, buffers, gradients, optimizer states); the
  batch tensors themselves are not counted (the data loader's, not the model's).

Every parameter, ``requires_grad`` flag, gradient and the torch RNG state are restored exactly afterwards
(the parameters are copied back from a snapshot; the optimizer is a throwaway one at lr 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solvers.errors import ProblemError
from solvers.memspec import opt_states

__all__ = ["Measurement", "measure", "measure_peak", "set_trainable", "default_loss", "find_lora_params",
           "random_batch", "batch_shape", "batch_tokens", "LossFn"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Measurement:
    """Bytes of one training step of a model under a set of trainable parameters.

    ``total = saved_bytes + param_bytes + grad_bytes + optimizer_bytes`` (the saved-tensor count).
    ``peak_bytes``: the allocator-level peak of forward + backward + optimizer step (None unless measured
    with ``peak=True``); ``reserved_bytes``: ``torch.cuda.memory_reserved`` after the step (CUDA only);
    ``cuda_peak``: ``peak_bytes`` on CUDA (kept for callers of the earlier API), None on CPU.
    """

    saved_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    cuda_peak: int | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None

    @property
    def total(self) -> int:
        return self.saved_bytes + self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def transient_bytes(self) -> int | None:
        """Peak minus the saved-tensor count: activation gradients, logits/loss buffers, step temporaries."""
        return None if self.peak_bytes is None else self.peak_bytes - self.total


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(**batch).loss`` when the model computes one, else cross-entropy of the logits on ``labels``."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _make_optimizer(optimizer: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """A throwaway optimizer of the named kind at lr 0 (its states have the real sizes)."""
    name = str(optimizer).lower()
    if name in ("adamw", "adam"):
        return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    return torch.optim.SGD(params, lr=0.0)


def _cpu_peak_delta(prof: torch.profiler.profile) -> int:
    """Largest running sum of the profiler's CPU allocation (+) and free (-) events, in time order."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their record order
    run = peak = 0
    for e in events:
        run += int(e.nbytes())
        peak = max(peak, run)
    return peak


def measure(
    model: nn.Module,
    batch: Mapping[str, Any],
    trainable: Iterable[nn.Parameter],
    loss_fn: LossFn | None = None,
    optimizer: str = "adamw",
    *,
    peak: bool = False,
) -> Measurement:
    """Measure the training memory of ``model`` on ``batch`` with only ``trainable`` requiring grad.

    Saved-for-backward tensors are counted in the forward pass through ``saved_tensors_hooks``: each
    distinct storage once (views share it), parameter storages excluded (they are in ``param_bytes``).
    Gradients and optimizer states are the bytes the trainable parameters will hold (AdamW: one gradient
    and two states per parameter). With ``peak`` (always on CUDA) the full step runs in the same pass and
    its allocator peak is reported (see the module docstring). Everything is restored afterwards.
    """
    loss_fn = loss_fn or default_loss
    states = opt_states(optimizer)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    train = list({id(p): p for p in trainable}.values())  # de-duplicated, order kept
    train_ids = {id(p) for p in train}
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}
    cuda = any(p.is_cuda for p in params)
    peak = peak or cuda
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), st.nbytes())
        return t

    param_bytes = sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in model.buffers())
    train_bytes = sum(_nbytes(p) for p in train)
    peak_bytes = reserved = None
    snapshot = [(p, p.detach().clone()) for p in train] if peak else []
    try:
        for p in params:
            p.requires_grad_(id(p) in train_ids)
            p.grad = None
        if not peak:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(model, batch)
            del loss
        else:
            peak_bytes, reserved = _step_peak(model, batch, train, loss_fn, optimizer, pack, cuda)
            peak_bytes += param_bytes
    finally:
        with torch.no_grad():
            for p, s in snapshot:
                p.copy_(s)
        for p, f, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(f)
            p.grad = g
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return Measurement(saved_bytes=int(sum(saved.values())), param_bytes=int(param_bytes),
                       grad_bytes=int(train_bytes), optimizer_bytes=int(states * train_bytes),
                       cuda_peak=peak_bytes if cuda else None, peak_bytes=peak_bytes, reserved_bytes=reserved)


def _step_peak(model, batch, train, loss_fn, optimizer, pack, cuda) -> tuple[int, int | None]:
    """(peak bytes above the parameters, reserved bytes) of one steady-state step; ``pack`` sees the forward.

    The optimizer's states and the gradients are created first (zeros, real sizes) so they are alive when
    the forward starts, as from the trainer's second local step on; the peak is the largest running sum of
    what is allocated from there on (states and gradients included).
    """
    opt = _make_optimizer(optimizer, train) if train else None

    def step() -> None:
        if opt is not None:  # allocated inside the measured region so that their frees are seen too
            for p in train:
                p.grad = torch.zeros_like(p)
            opt.step()  # lr 0: creates the states; the weights are restored from the snapshot anyway
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            if opt is not None:
                opt.step()
        del loss

    try:
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - base), int(torch.cuda.memory_reserved())
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        return _cpu_peak_delta(prof), None
    finally:
        if opt is not None:
            opt.state.clear()
        for p in train:
            p.grad = None


def measure_peak(
    model: nn.Module,
    batch: Mapping[str, Any],
    trainable: Iterable[nn.Parameter],
    loss_fn: LossFn | None = None,
    optimizer: str = "adamw",
) -> Measurement:
    """`measure` with ``peak=True``: the saved-tensor count and the allocator-level peak of the same step."""
    return measure(model, batch, trainable, loss_fn, optimizer, peak=True)


def set_trainable(
    lora_params: Mapping[str, Sequence[nn.Parameter]], plan: Mapping[str, int] | Iterable[str]
) -> None:
    """Make exactly the planned modules' LoRA parameters trainable (``requires_grad``); the rest frozen.

    A plan entry with rank 0 counts as unselected. Unselected modules then get no gradient, no optimizer
    state, and save nothing for backward (algorithms.md sec. 1: the Fed-HeLLo reference code keeps them
    trainable with lr 0, which saves no memory; we do not).
    """
    chosen = {m for m, r in plan.items() if int(r) > 0} if isinstance(plan, Mapping) else set(plan)
    unknown = sorted(chosen - set(lora_params))
    if unknown:
        raise ProblemError(f"plan names modules {unknown[:5]} that have no LoRA parameters")
    for name, ps in lora_params.items():
        for p in ps:
            p.requires_grad_(name in chosen)


def find_lora_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """LoRA factors of every adapted module: ``{name: [A, B]}`` with ``A [R, d_in]`` and ``B [d_out, R]``.

    Recognises modules with ``lora_A``/``lora_B`` parameters (fedkernels' LoRALinear) and peft's
    ``lora_A``/``lora_B`` ModuleDicts (first adapter).
    """
    out: dict[str, list[nn.Parameter]] = {}
    for name, mod in model.named_modules():
        A, B = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter):
            out[name] = [A, B]
        elif isinstance(A, nn.ModuleDict) and isinstance(B, nn.ModuleDict) and len(A) > 0:
            key = next(iter(A.keys()))
            out[name] = [A[key].weight, B[key].weight]
    return out


def random_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A seeded token batch from the model config's vocabulary and label count, one row partly padded."""
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 100) or 100)
    labels = int(getattr(cfg, "num_labels", 2) or 2)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, vocab), (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if seq_len > 1:  # real batches are padded: transformers then hands SDPA an explicit mask, saved per block
        mask[0, -max(1, seq_len // 4):] = 0
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
            "labels": torch.randint(0, labels, (batch_size,), generator=g).to(dev)}


def batch_shape(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(batch, sequence) of the first 2-D tensor of ``batch`` (a 1-D one gives sequence 1)."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[0]), int(v.shape[1])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            return int(v.shape[0]), 1
    return 1, 1


def batch_tokens(batch: Mapping[str, Any]) -> int:
    b, s = batch_shape(batch)
    return b * s
