"""Training-memory model of LoRA plans, and its measurement.

The model is the one of ../shared/docs/algorithms.md section 1(b) (Fed-pilot, arXiv 2410.10200, our [I]
formulation)::

    Mem(X) = M_static + sum_{i in X} c_i + sum_{j >= lmin(X)} a_j + M_head

* ``M_static``: every parameter and buffer (frozen base weights, all LoRA adapters present, trained or not).
* ``c_i``: module i's trainable bytes: its LoRA parameters' gradients and optimizer states
  (AdamW: 2 states per parameter), its saved ``A x`` (``b*s*r*e``, for dB) and its saved input
  (``b*s*d_in*e``, for dA). Modules that read the same tensor (BERT query/key/value, Llama q/k/v and
  gate/up) share that saved input: it is counted once per block in `MemoryModel.predict`.
* ``a_j``: what block j keeps so gradients can flow *through* it (norm inputs and statistics, attention
  q/k/v/out/logsumexp, GELU/SiLU inputs). Blocks below the lowest trainable block keep nothing: autograd
  records no graph there. In block ``lmin`` only the ops after its first trainable module count
  (`MemoryModel.entry_discount`).
* ``M_head``: the always-trained head (a classifier everyone trains): its gradients, optimizer states and
  the activations it saves.

Two ways to get the numbers: `MemoryModel.from_config` counts them analytically from a transformers
config (no weights: the model is instantiated on the ``meta`` device), `MemoryModel.from_model`
calibrates them by `measure` on the actual model (saved-for-backward bytes counted with
``torch.autograd.graph.saved_tensors_hooks``, storages de-duplicated, parameter storages excluded).

This package never imports ``fedkernels``: it measures any torch model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solvers.errors import ProblemError

__all__ = [
    "Measurement",
    "ModuleSpec",
    "MemoryModel",
    "measure",
    "set_trainable",
    "default_loss",
    "find_lora_params",
    "infer_blocks",
    "PRESETS",
]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

# Optimizer state bytes per trainable parameter, in units of the parameter's own element size.
# AdamW keeps exp_avg and exp_avg_sq (torch.optim.AdamW, same dtype as the parameter); plain SGD none.
_OPT_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _opt_states(optimizer: str) -> int:
    try:
        return _OPT_STATES[optimizer.lower()]
    except KeyError:
        raise ProblemError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(_OPT_STATES)}") from None


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ProblemError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------- measure
@dataclass(frozen=True)
class Measurement:
    """Bytes of one training step of a model under a set of trainable parameters.

    ``total = saved_bytes + param_bytes + grad_bytes + optimizer_bytes``; ``cuda_peak`` is
    ``torch.cuda.max_memory_allocated`` over forward, backward and an optimizer step (None on CPU).
    """

    saved_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    cuda_peak: int | None = None

    @property
    def total(self) -> int:
        return self.saved_bytes + self.param_bytes + self.grad_bytes + self.optimizer_bytes


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``model(**batch).loss`` when the model computes one, else cross-entropy of the logits on ``labels``."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def measure(
    model: nn.Module,
    batch: Mapping[str, Any],
    trainable: Iterable[nn.Parameter],
    loss_fn: LossFn | None = None,
    optimizer: str = "adamw",
) -> Measurement:
    """Measure the training memory of ``model`` on ``batch`` with only ``trainable`` requiring grad.

    Saved-for-backward tensors are counted in the forward pass through ``saved_tensors_hooks``: each
    distinct storage once (views share it), parameter storages excluded (they are in ``param_bytes``).
    Gradients and optimizer states are the bytes the trainable parameters will hold (AdamW: one gradient
    and two states per parameter). On CUDA the step is also run (backward and a zero-lr optimizer step,
    which leaves the weights unchanged) to report ``max_memory_allocated``. Every parameter's
    ``requires_grad`` and ``.grad`` is restored afterwards.
    """
    loss_fn = loss_fn or default_loss
    states = _opt_states(optimizer)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    train = list({id(p): p for p in trainable}.values())  # de-duplicated, order kept
    train_ids = {id(p) for p in train}
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), st.nbytes())
        return t

    cuda = any(p.is_cuda for p in params)
    peak = None
    try:
        for p in params:
            p.requires_grad_(id(p) in train_ids)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        if cuda and loss.requires_grad:
            opt = torch.optim.AdamW(train, lr=0.0, weight_decay=0.0) if states else torch.optim.SGD(train, lr=0.0)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            peak = int(torch.cuda.max_memory_allocated())
            del opt
        del loss
    finally:
        for p, f, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(f)
            p.grad = g
    param_bytes = sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in model.buffers())
    train_bytes = sum(_nbytes(p) for p in train)
    return Measurement(saved_bytes=int(sum(saved.values())), param_bytes=int(param_bytes),
                       grad_bytes=int(train_bytes), optimizer_bytes=int(states * train_bytes), cuda_peak=peak)


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


# ------------------------------------------------------------------------------------- model discovery
_PEFT_PREFIX = "base_model.model."
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def infer_blocks(names: Iterable[str]) -> dict[str, int]:
    """Block index of each module name: the first integer path component (``...layer.3.attention...``)."""
    out = {}
    for n in names:
        m = _INDEX.search(n)
        if m is None:
            raise ProblemError(f"cannot infer a block index from module name {n!r}; pass blocks=")
        out[n] = int(m.group(1))
    return out


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


def _kind(name: str) -> str:
    """Module name with its block index (and peft's wrapper prefix) removed: the same kind in every block."""
    name = name.removeprefix(_PEFT_PREFIX)
    return _INDEX.sub(lambda m: m.group(0).replace(m.group(1), "#"), name, count=1)


def _random_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-adapted module: name, block (0 = closest to the input), shapes and allocated rank.

    ``kind``: the name without its block index; ``group``: modules of one block sharing a group read the
    same input (its saved copy is counted once); ``order``: forward order inside the block.
    """

    name: str
    block: int
    d_in: int
    d_out: int
    max_rank: int
    kind: str = ""
    group: str = ""
    order: int = 0


@dataclass(frozen=True)
class MemoryModel:
    """Peak training bytes of LoRA plans: ``predict(plan)``, and the allocation problem it induces.

    Per module i (at allocated rank R_i): ``param_train_bytes[i]`` (gradients + optimizer states of its
    LoRA factors), ``rank_act_bytes[i]`` (saved ``A x``) and ``input_bytes[i]`` (saved input, shared in
    its group). ``block_costs[j]`` = a_j, so that the pass-through bytes of a plan whose lowest block is
    l are ``sum(block_costs[l:])``; ``entry_discount[kind]`` is subtracted when the first trained module
    of block l is of that kind (its block's earlier ops need not be kept). With ``rank_scaling`` the
    rank-sized terms scale as r / R (adapters sliced to the planned rank); otherwise a plan at any rank
    costs what rank R costs (full-size tensors allocated, ranks masked).
    """

    modules: tuple[ModuleSpec, ...]
    static_bytes: int
    head_bytes: int
    block_costs: tuple[int, ...]
    param_train_bytes: Mapping[str, int]
    rank_act_bytes: Mapping[str, int]
    input_bytes: Mapping[str, int]
    entry_discount: Mapping[str, int] = field(default_factory=dict)
    batch_size: int = 1
    seq_len: int = 1
    dtype: str = "float32"
    optimizer: str = "adamw"
    rank_scaling: bool = False
    source: str = "analytic"
    head_act_bytes: int = 0  # the activation part of head_bytes (rescaled by `calibrate`)
    _index: dict = field(init=False, repr=False, compare=False, hash=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ProblemError("a MemoryModel needs at least one LoRA module, got none")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ProblemError(f"duplicate module names in {names[:5]}...")
        object.__setattr__(self, "_index", {m.name: m for m in self.modules})
        nb = len(self.block_costs)
        for m in self.modules:
            if not 0 <= m.block < nb:
                raise ProblemError(f"module {m.name!r} has block {m.block}, outside [0, {nb})")
            if m.max_rank < 1:
                raise ProblemError(f"module {m.name!r} has max_rank {m.max_rank!r}; must be >= 1")

    # ------------------------------------------------------------------ views
    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def blocks(self) -> dict[str, int]:
        return {m.name: m.block for m in self.modules}

    @property
    def num_blocks(self) -> int:
        return len(self.block_costs)

    @property
    def max_rank(self) -> int:
        return max(m.max_rank for m in self.modules)

    def spec(self, name: str) -> ModuleSpec:
        """The module called ``name``; peft's ``base_model.model.`` prefix is accepted either way."""
        sp = self._index.get(name)
        if sp is None:
            alt = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + name
            sp = self._index.get(alt)
        if sp is None:
            raise ProblemError(f"unknown module {name!r}; the model has {self.module_names[:4]}...")
        return sp

    def pass_through(self, lowest_block: int) -> int:
        """Bytes kept by blocks ``lowest_block..L-1`` so gradients reach the lowest trained block."""
        return int(sum(self.block_costs[lowest_block:]))

    # ------------------------------------------------------------------ costs
    def _scale(self, spec: ModuleSpec, rank: int) -> float:
        if not 1 <= rank <= spec.max_rank:
            raise ProblemError(f"module {spec.name!r}: rank {rank!r} outside [1, {spec.max_rank}]")
        return rank / spec.max_rank if self.rank_scaling else 1.0

    def module_cost(self, name: str, rank: int | None = None) -> int:
        """c_i(r): the module's own bytes with its saved input counted in full (additive, conservative)."""
        spec = self.spec(name)
        s = self._scale(spec, spec.max_rank if rank is None else int(rank))
        return int(math.ceil(s * (self.param_train_bytes[name] + self.rank_act_bytes[name]))) + int(
            self.input_bytes[name])

    def _normalise(self, plan: Any) -> dict[str, int]:
        modules = getattr(plan, "modules", plan)
        if isinstance(modules, Mapping):
            out = {self.spec(str(m)).name: int(r) for m, r in modules.items() if int(r) > 0}
        else:
            out = {self.spec(str(m)).name: self.spec(str(m)).max_rank for m in modules}
        return out

    def predict(self, plan: Mapping[str, int] | Iterable[str] | Any) -> int:
        """Peak training bytes under ``plan`` (module -> rank, module names, or a `Plan`).

        Non-additive: the pass-through bytes depend on the lowest trained block, shared inputs are counted
        once per (block, group), and the lowest block's first trained module sets its entry discount.
        """
        chosen = self._normalise(plan)
        total = self.static_bytes + self.head_bytes
        if not chosen:
            return int(total)
        specs = [self.spec(m) for m in chosen]
        groups: dict[tuple[int, str], int] = {}
        for sp in specs:
            s = self._scale(sp, chosen[sp.name])
            total += math.ceil(s * (self.param_train_bytes[sp.name] + self.rank_act_bytes[sp.name]))
            key = (sp.block, sp.group or sp.name)
            groups[key] = max(groups.get(key, 0), int(self.input_bytes[sp.name]))
        total += sum(groups.values())
        low = min(sp.block for sp in specs)
        first = min((sp for sp in specs if sp.block == low), key=lambda sp: sp.order)
        total += self.pass_through(low) - int(self.entry_discount.get(first.kind, 0))
        return int(total)

    def min_trainable_bytes(self, rank_choices: Sequence[int] | None = None) -> int:
        """Least bytes of a plan training at least one module, under the solver's (additive) costs.

        Ranks are limited to ``rank_choices`` (default: each module's max rank, as `problem` does). A budget
        below this cannot train anything (`solvers.errors.InfeasibleBudgetError`).
        """
        best = None
        for sp in self.modules:
            ranks = [sp.max_rank] if rank_choices is None else [int(r) for r in rank_choices
                                                                if 1 <= int(r) <= sp.max_rank]
            for r in ranks:
                c = self.static_bytes + self.head_bytes + self.pass_through(sp.block) + self.module_cost(sp.name, r)
                best = c if best is None else min(best, c)
        if best is None:
            raise ProblemError(f"no rank in {list(rank_choices or [])} is allowed by any module")
        return int(best)

    def full_plan(self) -> dict[str, int]:
        return {m.name: m.max_rank for m in self.modules}

    def full_bytes(self) -> int:
        """Bytes of training every module at its maximum rank."""
        return self.predict(self.full_plan())

    def default_rank_choices(self) -> tuple[int, ...]:
        """Powers of two up to the largest rank, plus the largest rank (HetLoRA/FlexLoRA-style choices)."""
        top = self.max_rank
        out = {1 << k for k in range(int(math.log2(top)) + 1)} | {top}
        return tuple(sorted(out))

    # ------------------------------------------------------------------ problem
    def problem(
        self,
        budget: int,
        *,
        values: Mapping[str, float] | None = None,
        rank_choices: Sequence[int] | None = None,
        client: int | None = None,
        quantum: int | None = None,
    ):
        """The client's `solvers.AllocationProblem`: items = modules x rank choices, a_j = ``block_costs``.

        Item costs are `module_cost` (saved input counted per module, entry discount ignored), so they
        never undercount `predict`: a plan within budget under the problem is within budget under
        `predict`. Values: ``values[name]`` (default 1 per module) times ``log2(1+r)/log2(1+R)`` for rank
        r (diminishing returns in rank; our [I] choice, 1 at the full rank).
        """
        from solvers.problem import AllocationProblem, Item

        items = []
        for sp in self.modules:
            ranks = (sp.max_rank,) if rank_choices is None else tuple(
                sorted({int(r) for r in rank_choices if 1 <= int(r) <= sp.max_rank}))
            if not ranks:
                raise ProblemError(f"module {sp.name!r}: no rank in {list(rank_choices or [])} fits "
                                   f"its max rank {sp.max_rank}")
            v = 1.0 if values is None else float(values.get(sp.name, 0.0))
            items.append(Item(
                name=sp.name, block=sp.block, ranks=ranks,
                costs=tuple(self.module_cost(sp.name, r) for r in ranks),
                values=tuple(v * math.log2(1 + r) / math.log2(1 + sp.max_rank) for r in ranks),
            ))
        kwargs = {} if quantum is None else {"quantum": int(quantum)}
        return AllocationProblem(items=tuple(items), block_costs=tuple(int(a) for a in self.block_costs),
                                 static_bytes=int(self.static_bytes), head_bytes=int(self.head_bytes),
                                 budget=int(budget), client=client, **kwargs)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (e.g. to save a model calibrated on a GPU box and plan elsewhere)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_index"}
        out["modules"] = [asdict(m) for m in self.modules]
        out["block_costs"] = list(self.block_costs)
        for k in ("param_train_bytes", "rank_act_bytes", "input_bytes", "entry_discount"):
            out[k] = dict(out[k])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryModel:
        """Inverse of `to_dict`; ProblemError naming a missing or unknown key."""
        known = {f.name for f in fields(cls) if f.name != "_index"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProblemError(f"MemoryModel.from_dict: unknown keys {unknown}")
        try:
            mods = tuple(ModuleSpec(**m) for m in data["modules"])
            kw = {k: data[k] for k in known if k in data}
            kw.update(modules=mods, block_costs=tuple(int(a) for a in data["block_costs"]))
            return cls(**kw)
        except KeyError as exc:
            raise ProblemError(f"MemoryModel.from_dict: missing key {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ProblemError(f"MemoryModel.from_dict: {exc}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        batch_size: int,
        seq_len: int,
        rank: int,
        targets: Sequence[str] | None = None,
        task: str = "classification",
        dtype: str = "float32",
        optimizer: str = "adamw",
        num_labels: int = 2,
        rank_scaling: bool = True,
        padded: bool = False,
    ) -> MemoryModel:
        """Analytic model from a transformers config (object, dict, config.json path, folder or preset).

        No weights are loaded: the model is built on the ``meta`` device to count parameters and find the
        target modules. Activation terms are counted for PyTorch's CPU/GPU SDPA attention (saves q, k, v,
        output and a float32 logsumexp; no s x s matrix), dropout off (``model.eval()``). ``padded``: batches
        carry padding in their attention mask; transformers then passes SDPA an explicit ``[b, 1, s, s]`` mask
        that every block saves, and Llama expands grouped keys/values to all heads. See `solvers._analytic`
        for the per-block accounting of BERT-, GPT-2- and Llama-style blocks.
        """
        from solvers import _analytic

        return _analytic.build(cls, config, batch_size=batch_size, seq_len=seq_len, rank=rank, targets=targets,
                               task=task, dtype=dtype, optimizer=optimizer, num_labels=num_labels,
                               rank_scaling=rank_scaling, padded=padded)

    @classmethod
    def from_model(
        cls,
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
    ) -> MemoryModel:
        """Model calibrated by `measure` on ``model`` and ``batch``.

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
        alone in the reference block (its entry discount).
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
            batch = _random_batch(model, int(batch_size), int(seq_len))
        lora_ids = {id(p) for ps in lora_params.values() for p in ps}
        if always_trainable is None:
            always_trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
        always = list(always_trainable)
        states = _opt_states(optimizer)

        def saved(modules: Iterable[str]) -> int:
            ps = always + [p for m in modules for p in lora_params[m]]
            return measure(model, batch, ps, loss_fn, optimizer).saved_bytes

        specs = _discover_specs(model, batch, lora_params, blocks, loss_fn)
        by_block: dict[int, list[ModuleSpec]] = {}
        for sp in specs:
            by_block.setdefault(sp.block, []).append(sp)
        nb = max(by_block) + 1
        empty = measure(model, batch, always, loss_fn, optimizer)
        s0 = empty.saved_bytes
        e_act = lora_params[specs[0].name][0].element_size()
        tokens = _tokens(batch)

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
            P[j] = max(P[j + 1], saved([sp.name for sp in mods]) - s0 - block_terms(mods))
        a = tuple(int(P[j] - P[j + 1]) for j in range(nb))
        # entry discounts, in the reference block of each kind
        for kind, ref in kinds.items():
            mods = by_block[ref.block]
            first = min(mods, key=lambda sp: sp.order)
            if first.kind == kind or len(mods) == 1:
                continue
            alone = saved([ref.name]) - s0 - block_terms([ref])
            entry[kind] = int(max(0, P[ref.block] - alone))

        param_train = {n: int((1 + states) * sum(_nbytes(p) for p in ps)) for n, ps in lora_params.items()}
        head = s0 + (1 + states) * sum(_nbytes(p) for p in always)
        dtype = str(lora_params[specs[0].name][0].dtype).replace("torch.", "")
        return cls(modules=tuple(specs), static_bytes=int(empty.param_bytes), head_bytes=int(head),
                   block_costs=a, param_train_bytes=param_train, rank_act_bytes=rank_act, input_bytes=inp,
                   entry_discount=entry, batch_size=int(_shape(batch)[0]), seq_len=int(_shape(batch)[1]),
                   dtype=dtype, optimizer=optimizer, rank_scaling=rank_scaling, source="measured",
                   head_act_bytes=int(s0))

    def calibrate(
        self,
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
        analytic values. Modules are matched by name; blocks must agree.
        """
        fit = MemoryModel.from_model(model, batch, lora_params, blocks, loss_fn=loss_fn, optimizer=self.optimizer,
                                     always_trainable=always_trainable)
        return calibrate_from(self, fit, _tokens(batch))


def calibrate_from(model: MemoryModel, fit: MemoryModel, fit_tokens: int) -> MemoryModel:
    """``model`` with the activation terms of ``fit`` (measured on ``fit_tokens`` tokens) rescaled."""
    if fit.num_blocks != model.num_blocks:
        raise ProblemError(f"calibrate: measured model has {fit.num_blocks} blocks, this one {model.num_blocks}")
    ratio = model.batch_size * model.seq_len / fit_tokens
    by_kind_fit = {sp.kind: sp for sp in fit.modules}
    rank_act, inp = {}, {}
    for sp in model.modules:
        ref = by_kind_fit.get(sp.kind)
        if ref is None:
            raise ProblemError(f"calibrate: module kind {sp.kind!r} was not in the measured model")
        rscale = sp.max_rank / ref.max_rank
        rank_act[sp.name] = int(round(fit.rank_act_bytes[ref.name] * ratio * rscale))
        inp[sp.name] = int(round(fit.input_bytes[ref.name] * ratio))
    head_params = model.head_bytes - model.head_act_bytes
    head_act = int(round(fit.head_act_bytes * ratio))
    return replace(
        model,
        block_costs=tuple(int(round(a * ratio)) for a in fit.block_costs),
        head_bytes=int(head_params + head_act),
        head_act_bytes=head_act,
        rank_act_bytes=rank_act,
        input_bytes=inp,
        entry_discount={k: int(round(v * ratio)) for k, v in fit.entry_discount.items()},
        source=f"{model.source}+calibrated",
    )


def _shape(batch: Mapping[str, Any]) -> tuple[int, int]:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[0]), int(v.shape[1])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            return int(v.shape[0]), 1
    return 1, 1


def _tokens(batch: Mapping[str, Any]) -> int:
    b, s = _shape(batch)
    return b * s


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
                                max_rank=int(A.shape[0]), kind=_kind(name), group=group,
                                order=order.get(name, 0)))
    # order relative to the block: rank of the global call order among the block's modules
    out = []
    for sp in specs:
        same = sorted((o.order, o.name) for o in specs if o.block == sp.block)
        out.append(replace(sp, order=same.index((sp.order, sp.name))))
    return out


from solvers._analytic import PRESETS  # noqa: E402  (re-export; _analytic imports nothing from here at load)
