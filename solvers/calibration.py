"""Calibration of a `MemoryModel` by measurement on the real torch model (`solvers.measure`).

`fit` builds a model from 2 + L + 2K + G measured passes (see its docstring); `calibrate` refits an
analytic model's activation and peak terms on a small instance of the same architecture. Both need torch;
the model itself (`solvers.memory_model`) does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from solvers.errors import ProblemError
from solvers.measure import (
    LossFn,
    Measurement,
    batch_shape,
    batch_tokens,
    default_loss,
    find_lora_params,
    measure,
    random_batch,
)
from solvers.memory_model import MemoryModel, calibrate_from
from solvers.memspec import ModuleSpec, dtype_name, infer_blocks, kind_of, opt_scalar_bytes, opt_states

__all__ = ["fit", "calibrate"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def fit(
    cls: type[MemoryModel],
    model: nn.Module,
    batch: Mapping[str, Any] | None = None,
    lora_params: Mapping[str, Sequence[nn.Parameter]] | None = None,
    blocks: Mapping[str, int] | None = None,
    *,
    loss_fn: LossFn | None = None,
    optimizer: str = "adamw",
    always_trainable: Sequence[nn.Parameter] | None = None,
    rank_scaling: bool = False,
    batch_size: int | None = None,
    seq_len: int | None = None,
    rank: int | None = None,
    peak: bool = True,
) -> MemoryModel:
    """`MemoryModel` (``cls``) calibrated by `measure` on ``model`` and ``batch``.

    ``lora_params`` maps module names to ``[A, B]`` (found with `find_lora_params` when omitted);
    ``blocks`` maps them to block indices (from the names when omitted). ``always_trainable`` are
    parameters every plan trains (a classifier head); when omitted, the non-LoRA parameters that
    currently require grad. Without ``batch``, a random token batch of ``batch_size`` x ``seq_len`` is
    drawn from the model config's vocabulary and label count. ``rank`` is accepted for symmetry with
    `from_config`; the allocated rank is read from the LoRA factors.

    Measurements (L blocks, K module kinds, G shared-input groups; 2 + L + 2K + G forward passes):
    the head alone; each block's modules alone (gives sum_{j>=l} a_j plus that block's module terms);
    in a reference block above a trained block 0, each kind alone and each group together (gives each
    module's rank-sized and shared-input terms, assumed equal across blocks for one kind); each kind
    alone in the reference block (its entry discount). With ``peak`` (default) the head-alone and the
    block-alone passes and each kind alone in its reference block also run the whole step and measure its
    allocator peak: their excess over the saved-tensor count is ``head_transient_bytes`` and
    ``transient_bytes[l]`` (l = that block) and ``kind_transient_bytes[kind]`` (each kind's alone excess).
    """
    del rank
    if lora_params is None:
        lora_params = find_lora_params(model)
    lora_params = {str(k): list(v) for k, v in lora_params.items()}
    if not lora_params:
        raise ProblemError("from_model: the model has no LoRA parameters (pass lora_params=)")
    blocks = dict(blocks) if blocks is not None else infer_blocks(lora_params)
    missing = sorted(set(lora_params) - set(blocks))
    if missing:
        raise ProblemError(f"from_model: no block given for modules {missing[:5]}")
    if batch is None:
        if batch_size is None or seq_len is None:
            raise ProblemError("from_model: pass a batch, or batch_size and seq_len to draw one")
        batch = random_batch(model, int(batch_size), int(seq_len))
    lora_ids = {id(p) for ps in lora_params.values() for p in ps}
    if always_trainable is None:
        always_trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
    always = list(always_trainable)
    states = opt_states(optimizer)
    transients: dict[int, int] = {}
    cache: dict[frozenset, Measurement] = {}

    def run(modules: Iterable[str], with_peak: bool = False) -> Measurement:
        modules = list(modules)
        key = frozenset(modules)
        hit = cache.get(key)
        if hit is not None and (hit.peak_bytes is not None or not (with_peak and peak)):
            return hit
        ps = always + [p for m in modules for p in lora_params[m]]
        cache[key] = measure(model, batch, ps, loss_fn, optimizer, peak=with_peak and peak)
        return cache[key]

    def saved(modules: Iterable[str]) -> int:
        return run(modules).saved_bytes

    specs = _discover_specs(model, batch, lora_params, blocks, loss_fn)
    by_block: dict[int, list[ModuleSpec]] = {}
    for sp in specs:
        by_block.setdefault(sp.block, []).append(sp)
    nb = max(by_block) + 1
    empty = run([], with_peak=True)
    s0 = empty.saved_bytes
    e_act = lora_params[specs[0].name][0].element_size()
    tokens = batch_tokens(batch)

    # module terms, measured per kind in the highest block holding it, above a trained block 0
    rank_act: dict[str, int] = {}
    inp: dict[str, int] = {}
    entry: dict[str, int] = {}
    kinds: dict[str, ModuleSpec] = {}
    for sp in specs:
        if sp.kind not in kinds or sp.block > kinds[sp.kind].block:
            kinds[sp.kind] = sp
    base_plan = [sp.name for sp in by_block.get(0, [])]
    base = saved(base_plan) if base_plan else None
    kind_act: dict[str, int] = {}
    kind_in: dict[str, int] = {}
    for kind, ref in kinds.items():
        if ref.block == 0 or base is None:  # nothing below to fix lmin: count the tensors analytically
            kind_act[kind] = tokens * ref.max_rank * e_act
            kind_in[kind] = tokens * ref.d_in * e_act
        else:
            kind_act[kind] = saved([*base_plan, ref.name]) - base  # rank part + its input, unshared
            kind_in[kind] = -1
    # shared inputs: a group's modules together save the input once
    seen_groups = set()
    for kind, ref in kinds.items():
        if kind_in[kind] >= 0 or ref.group in seen_groups:
            continue
        mates = [sp for sp in by_block[ref.block] if sp.group == ref.group]
        seen_groups.add(ref.group)
        if len(mates) == 1:
            kind_in[kind] = tokens * ref.d_in * e_act
            continue
        together = saved([*base_plan, *(sp.name for sp in mates)]) - base
        shared = max(0, (sum(kind_act[sp.kind] for sp in mates) - together) // (len(mates) - 1))
        for sp in mates:
            kind_in[sp.kind] = shared
    for kind in kinds:
        if kind_in[kind] < 0:
            kind_in[kind] = tokens * kinds[kind].d_in * e_act
    for sp in specs:
        inp[sp.name] = int(min(kind_in[sp.kind], kind_act[sp.kind]))
        rank_act[sp.name] = int(max(0, kind_act[sp.kind] - inp[sp.name]))

    def block_terms(mods: Sequence[ModuleSpec]) -> int:
        g: dict[str, int] = {}
        for sp in mods:
            g[sp.group or sp.name] = max(g.get(sp.group or sp.name, 0), inp[sp.name])
        return sum(rank_act[sp.name] for sp in mods) + sum(g.values())

    # pass-through: P(l) = saved(block l's modules) - head - their module terms
    P = [0] * (nb + 1)
    for j in range(nb - 1, -1, -1):
        mods = by_block.get(j)
        if not mods:
            P[j] = P[j + 1]
            continue
        alone = run([sp.name for sp in mods], with_peak=True)
        if alone.transient_bytes is not None:
            transients[j] = max(0, alone.transient_bytes)
        P[j] = max(P[j + 1], alone.saved_bytes - s0 - block_terms(mods))
    a = tuple(int(P[j] - P[j + 1]) for j in range(nb))
    # each kind alone in its reference block: its step can peak higher above its saved-tensor count than
    # the whole block's (tiny Llama, down_proj alone: +12 KiB, one T x h activation), and a plan's top
    # trained block may hold only that kind (tiny GPT-2 at 8 x 64: c_fc alone 877 KB, the whole block 681 KB)
    kind_transient: dict[str, int] = {}
    for kind, ref in kinds.items():
        one = run([ref.name], with_peak=True)
        if one.transient_bytes is not None:
            kind_transient[kind] = int(max(0, one.transient_bytes))
    # entry discounts, in the reference block of each kind
    for kind, ref in kinds.items():
        mods = by_block[ref.block]
        first = min(mods, key=lambda sp: sp.order)
        if first.kind == kind or len(mods) == 1:
            continue
        alone = saved([ref.name]) - s0 - block_terms([ref])
        entry[kind] = int(max(0, P[ref.block] - alone))

    # blocks without modules take the transient of the next block up (their plans start there)
    trans: list[int] = [0] * nb
    for j in range(nb - 1, -1, -1):
        trans[j] = transients.get(j, trans[j + 1] if j + 1 < nb else 0)
    scalar = opt_scalar_bytes(optimizer)  # Adam's per-tensor step counter
    param_train = {n: int((1 + states) * sum(_nbytes(p) for p in ps) + scalar * len(ps))
                   for n, ps in lora_params.items()}
    head = s0 + (1 + states) * sum(_nbytes(p) for p in always)
    dtype = dtype_name(lora_params[specs[0].name][0].dtype)
    return cls(modules=tuple(specs), static_bytes=int(empty.param_bytes), head_bytes=int(head),
               block_costs=a, param_train_bytes=param_train, rank_act_bytes=rank_act, input_bytes=inp,
               entry_discount=entry, batch_size=int(batch_shape(batch)[0]), seq_len=int(batch_shape(batch)[1]),
               dtype=dtype, optimizer=optimizer, rank_scaling=rank_scaling, source="measured",
               head_act_bytes=int(s0), transient_bytes=tuple(trans) if peak else (),
               head_transient_bytes=int(max(0, empty.transient_bytes or 0)),
               kind_transient_bytes=kind_transient if peak else {})

def calibrate(
    self: MemoryModel,
    model: nn.Module,
    batch: Mapping[str, Any],
    lora_params: Mapping[str, Sequence[nn.Parameter]] | None = None,
    blocks: Mapping[str, int] | None = None,
    *,
    loss_fn: LossFn | None = None,
    always_trainable: Sequence[nn.Parameter] | None = None,
) -> MemoryModel:
    """Refit the activation terms (a_j, head, module terms) of this model by measurement.

    ``model`` is a (small) instance of the same architecture with the same targets, e.g. built from
    the same config with fewer tokens per batch; measured activation bytes are rescaled by the ratio of
    tokens (batch x sequence) of this model to ``batch``'s (linear in tokens: SDPA saves no s x s
    matrix). Parameter-derived terms (static bytes, gradients, optimizer states) keep this model's
    analytic values. Modules are matched by kind; blocks must agree. The peak transients are rescaled
    the same way (activation gradients and logits are linear in tokens too).
    """
    measured = fit(type(self), model, batch, lora_params, blocks, loss_fn=loss_fn, optimizer=self.optimizer,
                   always_trainable=always_trainable)
    return calibrate_from(self, measured, batch_tokens(batch))




def _discover_specs(
    model: nn.Module,
    batch: Mapping[str, Any],
    lora_params: Mapping[str, Sequence[nn.Parameter]],
    blocks: Mapping[str, int],
    loss_fn: LossFn | None,
) -> list[ModuleSpec]:
    """Shapes from the factors; forward order and shared inputs from one hooked no-grad forward pass."""
    owner: dict[int, nn.Module] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mod)
    order: dict[str, int] = {}
    src: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # inputs held alive so the allocator cannot reuse their addresses
    handles = []
    for name, ps in lora_params.items():
        mod = owner.get(id(ps[0]))
        if mod is None:
            raise ProblemError(f"module {name!r}: its LoRA A factor is not a parameter of the model")

        def hook(_m, args, _name=name):
            if _name not in order and args and isinstance(args[0], torch.Tensor):
                order[_name] = len(order)
                src[_name] = args[0].untyped_storage().data_ptr()
                keep.append(args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            (loss_fn or default_loss)(model, batch)
    finally:
        for h in handles:
            h.remove()
    keep.clear()
    specs = []
    for name, ps in lora_params.items():
        A, B = ps[0], ps[-1]
        if A.dim() != 2 or B.dim() != 2:
            raise ProblemError(f"module {name!r}: LoRA factors must be 2-D, got {tuple(A.shape)}, {tuple(B.shape)}")
        blk = int(blocks[name])
        group = f"in@{src[name]}" if name in src else name
        specs.append(ModuleSpec(name=name, block=blk, d_in=int(A.shape[1]), d_out=int(B.shape[0]),
                                max_rank=int(A.shape[0]), kind=kind_of(name), group=group,
                                order=order.get(name, 0)))
    # order relative to the block: rank of the global call order among the block's modules
    out = []
    for sp in specs:
        same = sorted((o.order, o.name) for o in specs if o.block == sp.block)
        out.append(replace(sp, order=same.index((sp.order, sp.name))))
    return out


