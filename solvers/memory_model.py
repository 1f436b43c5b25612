"""Peak training memory of LoRA plans: the model (`MemoryModel`, `predict`), with no torch import.

The model is the one of ../shared/docs/algorithms.md section 1(b) (Fed-pilot, arXiv 2410.10200, our [I]
formulation), extended to the allocator's peak (issue 13)::

    Peak(X) = (M_static + sum_{i in X} c_i + sum_{j >= lmin(X)} a_j + M_head + E(lmin(X))) * (1 + margin)

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
* ``E(l)``: the transient on top of that saved-tensor sum at the allocator's peak, when l is the lowest
  trained block (``transient_bytes``): the activation gradients alive at once in backward (the gradient
  of the hidden state plus the largest op's input/output gradients), the logits and loss buffers (the
  head term: ``T x vocab`` floats for a causal LM, SmolLM2's 49k vocabulary makes it dominate), and the
  optimizer step's temporaries. Measured per lowest block by the same passes that calibrate ``a_j``
  (`solvers.calibration`); ``E`` is made non-increasing in l (a lower start never costs less), so a plan is
  never predicted below a measured block-alone plan. ``head_transient_bytes``: the same for a plan
  training only the head.
* ``margin``: a relative safety margin for allocator fragmentation (CUDA's caching allocator rounds
  blocks to 512 B and holds 2 MiB segments); plans, `min_trainable_bytes` and every budget check include it.

Two ways to get the numbers: `MemoryModel.from_config` counts them analytically from a transformers
config (no weights: `solvers._analytic`), `MemoryModel.from_model` calibrates them by measurement on the
actual model (`solvers.calibration`, which needs torch; `solvers.measure` is the yardstick).

This package never imports ``fedkernels``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from solvers import _analytic
from solvers.errors import ProblemError
from solvers.memspec import PEFT_PREFIX as _PEFT_PREFIX
from solvers.memspec import ModuleSpec, opt_scalar_bytes, opt_states

__all__ = ["MemoryModel", "ModuleSpec", "calibrate_from"]


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

    Peak terms (issue 13): ``transient_bytes[l]`` = E(l), the allocator peak above the saved-tensor sum
    when l is the lowest trained block (empty: none known, 0); ``head_transient_bytes`` the same when only
    the head trains; ``margin`` the relative safety margin every prediction carries.
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
    transient_bytes: tuple[int, ...] = ()
    head_transient_bytes: int = 0
    kind_transient_bytes: Mapping[str, int] = field(default_factory=dict)
    margin: float = 0.0
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
        if self.transient_bytes and len(self.transient_bytes) != nb:
            raise ProblemError(f"transient_bytes has {len(self.transient_bytes)} entries, block_costs {nb}")
        kinds = tuple(self.kind_transient_bytes.values())
        if any(int(t) < 0 for t in (*self.transient_bytes, self.head_transient_bytes, *kinds)):
            raise ProblemError(f"transient bytes must be >= 0, got {tuple(self.transient_bytes)} and "
                               f"{self.head_transient_bytes!r}")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m) or not 0 <= m < 1:
            raise ProblemError(f"memory margin must be a fraction in [0, 1), got {m!r}")
        object.__setattr__(self, "transient_bytes", tuple(int(t) for t in self.transient_bytes))

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

    def transient(self, lowest_block: int) -> int:
        """E(l): peak bytes above the saved-tensor sum when ``lowest_block`` is the lowest trained block.

        An upper bound over every plan with that lowest block: the largest of the measured block transients
        ``transient_bytes[lowest_block:]`` and ``kind_transient_bytes``, so E never grows with l (a plan
        starting lower is never predicted to peak lower on this term). `predict` refines it per plan.
        """
        kinds = max(self.kind_transient_bytes.values(), default=0)
        if not self.transient_bytes:
            return int(kinds)
        return int(max(max(self.transient_bytes[lowest_block:]), kinds))

    def peak_block_costs(self) -> tuple[int, ...]:
        """``a'_j`` with ``sum(a'[l:]) = pass_through(l) + transient(l)``: the problem's pass-through costs.

        Non-negative because both terms are non-increasing in l.
        """
        nb = self.num_blocks
        tot = [self.pass_through(j) + self.transient(j) for j in range(nb)] + [0]
        return tuple(int(tot[j] - tot[j + 1]) for j in range(nb))

    def _with_margin(self, nbytes: int | float) -> int:
        return int(math.ceil(nbytes * (1.0 + float(self.margin))))

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
        """Peak training bytes under ``plan`` (module -> rank, module names, or a `Plan`), margin included.

        Non-additive: the pass-through bytes and the transient depend on the lowest trained block, shared
        inputs are counted once per (block, group), and the lowest block's first trained module sets its
        entry discount.
        """
        return self._with_margin(self.saved_count(plan) + self._plan_transient(plan))

    def grad_bytes(self, name: str, rank: int | None = None) -> int:
        """Bytes of module ``name``'s LoRA gradients at ``rank`` (part of ``param_train_bytes``)."""
        spec = self.spec(name)
        s = self._scale(spec, spec.max_rank if rank is None else int(rank))
        scalars = 2 * opt_scalar_bytes(self.optimizer)  # A's and B's step counters are not gradients
        return int(s * max(0, self.param_train_bytes[spec.name] - scalars) / (1 + opt_states(self.optimizer)))

    def _plan_transient(self, plan: Any) -> int:
        """The plan's peak above its saved-tensor count: ``max_j (E_j - G_<j)`` over blocks j >= lmin.

        ``E_j`` (``transient_bytes[j]``) is the excess measured when block j alone trains: the step then
        peaks in block j's backward or above it. In a plan, when backward is at block j the gradients of
        the modules below j are not allocated yet (the trainer zeroes gradients to None before backward),
        while the saved-tensor count holds every gradient: ``G_<j``, the plan's gradient bytes below j, is
        subtracted (tiny BERT, 4 blocks, all 8 modules: 12 KiB, the measured gap to the block-0-alone
        transient within 50 bytes). When the plan's top trained block trains only some of the kinds
        it holds, ``kind_transient_bytes[k]`` (kind k alone in its top block) of those kinds is a candidate
        there too (one kind alone can peak higher above its count than the whole block).
        """
        chosen = self._normalise(plan)
        if not chosen:
            return int(self.head_transient_bytes)
        blocks = {m: self.spec(m).block for m in chosen}
        low, top = min(blocks.values()), max(blocks.values())
        grads = [0] * (self.num_blocks + 1)  # grads[j] = plan gradient bytes in blocks < j
        for m, r in chosen.items():
            grads[blocks[m] + 1] += self.grad_bytes(m, r)
        for j in range(1, self.num_blocks + 1):
            grads[j] += grads[j - 1]
        top_kinds = {self.spec(m).kind for m in chosen if blocks[m] == top}
        held = {sp.kind for sp in self.modules if sp.block == top}
        best = 0
        if top_kinds != held:
            best = max((self.kind_transient_bytes.get(k, 0) for k in top_kinds), default=0) - grads[top]
        for j in range(low, len(self.transient_bytes)):
            best = max(best, self.transient_bytes[j] - grads[j])
        return int(max(0, best))

    def saved_count(self, plan: Mapping[str, int] | Iterable[str] | Any) -> int:
        """The saved-tensor count of ``plan`` (what `solvers.measure.measure` adds up), without peak terms."""
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
                c = (self.static_bytes + self.head_bytes + self.pass_through(sp.block) + self.transient(sp.block)
                     + self.module_cost(sp.name, r))
                best = c if best is None else min(best, c)
        if best is None:
            raise ProblemError(f"no rank in {list(rank_choices or [])} is allowed by any module")
        return self._with_margin(best)

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

        Item costs are `module_cost` (saved input counted per module, entry discount ignored) and the
        pass-through costs `peak_block_costs` (transient included), all scaled by ``1 + margin``, so they
        never undercount `predict`: a plan within budget under the problem is within budget under
        `predict` (plans train at least one module: the empty selection's head-only transient is left out).
        Values: ``values[name]`` (default 1 per module) times ``log2(1+r)/log2(1+R)`` for rank
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
                costs=tuple(self._with_margin(self.module_cost(sp.name, r)) for r in ranks),
                values=tuple(v * math.log2(1 + r) / math.log2(1 + sp.max_rank) for r in ranks),
            ))
        kwargs = {} if quantum is None else {"quantum": int(quantum)}
        return AllocationProblem(items=tuple(items),
                                 block_costs=tuple(self._with_margin(a) for a in self.peak_block_costs()),
                                 static_bytes=self._with_margin(self.static_bytes),
                                 head_bytes=self._with_margin(self.head_bytes),
                                 budget=int(budget), client=client, **kwargs)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (e.g. to save a model calibrated on a GPU box and plan elsewhere)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_index"}
        out["modules"] = [asdict(m) for m in self.modules]
        out["block_costs"] = list(self.block_costs)
        out["transient_bytes"] = list(self.transient_bytes)
        for k in ("param_train_bytes", "rank_act_bytes", "input_bytes", "entry_discount", "kind_transient_bytes"):
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
            kw.update(modules=mods, block_costs=tuple(int(a) for a in data["block_costs"]),
                      transient_bytes=tuple(int(t) for t in data.get("transient_bytes", ())))
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
        dtype: str | None = None,
        optimizer: str = "adamw",
        num_labels: int = 2,
        rank_scaling: bool = True,
        padded: bool = False,
    ) -> MemoryModel:
        """Analytic model from a transformers config (object, dict, config.json path, folder or preset).

        No weights are loaded: a preset name is counted from its hyperparameters (no torch or transformers
        import); any other config is built on the ``meta`` device to count parameters and find the target
        modules. Activation terms are counted for PyTorch's CPU/GPU SDPA attention (saves q, k, v,
        output and a float32 logsumexp; no s x s matrix), dropout off (``model.eval()``). ``padded``: batches
        carry padding in their attention mask; transformers then passes SDPA an explicit ``[b, 1, s, s]`` mask
        that every block saves, and Llama expands grouped keys/values to all heads. See `solvers._analytic`
        for the per-block accounting of BERT-, GPT-2- and Llama-style blocks and their peak transients.
        ``dtype`` None: what users run, `solvers._analytic.default_dtype` (bfloat16 for models of 1B
        parameters and up, float32 below).
        """
        return _analytic.build(cls, config, batch_size=batch_size, seq_len=seq_len, rank=rank, targets=targets,
                               task=task, dtype=dtype, optimizer=optimizer, num_labels=num_labels,
                               rank_scaling=rank_scaling, padded=padded)

    @classmethod
    def from_model(cls, model: Any, batch: Mapping[str, Any] | None = None,
                   lora_params: Mapping[str, Sequence[Any]] | None = None, blocks: Mapping[str, int] | None = None,
                   **kwargs: Any) -> MemoryModel:
        """Model calibrated by measurement on a torch ``model`` (see `solvers.calibration.fit`)."""
        from solvers.calibration import fit

        return fit(cls, model, batch, lora_params, blocks, **kwargs)

    def calibrate(self, model: Any, batch: Mapping[str, Any], lora_params: Mapping[str, Sequence[Any]] | None = None,
                  blocks: Mapping[str, int] | None = None, **kwargs: Any) -> MemoryModel:
        """Refit the activation and peak terms of this model by measurement (`solvers.calibration.calibrate`)."""
        from solvers.calibration import calibrate

        return calibrate(self, model, batch, lora_params, blocks, **kwargs)

    def with_margin(self, margin: float) -> MemoryModel:
        """This model with relative safety margin ``margin`` (e.g. 0.05: every prediction 5 % higher)."""
        return replace(self, margin=float(margin))


def calibrate_from(model: MemoryModel, fit: MemoryModel, fit_tokens: int) -> MemoryModel:
    """``model`` with the activation and peak terms of ``fit`` (measured on ``fit_tokens`` tokens) rescaled.

    The transients are activation gradients and logits, linear in tokens like the saved activations.
    """
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
        transient_bytes=tuple(int(math.ceil(t * ratio)) for t in fit.transient_bytes),
        head_transient_bytes=int(math.ceil(fit.head_transient_bytes * ratio)),
        kind_transient_bytes={k: int(math.ceil(v * ratio)) for k, v in fit.kind_transient_bytes.items()},
        source=f"{model.source}+calibrated",
    )


