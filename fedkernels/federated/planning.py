"""Bridge from the trainer to `solvers`: memory model of the shared model, budgets, per-round plans."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedkernels.errors import ConfigError
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.data import rng_for

log = logging.getLogger("fedkernels.federated")

__all__ = ["Planner", "read_budgets_csv"]


def read_budgets_csv(path: str | Path, num_clients: int) -> dict[int, int]:
    """``client,budget`` rows (budget in human units such as ``6GiB``); a header row is allowed.

    Parsed by `solvers.units.read_budget_csv` (the parser ``fedkernels plan`` uses): ids are kept and a
    duplicate id is rejected with its line. The trainer's clients are 0..num_clients-1: every one needs a
    budget and no other id may appear. ConfigError names the file and the offending ids or line.
    """
    from solvers.errors import SolversError
    from solvers.units import read_budget_csv

    try:
        out = read_budget_csv(path)
    except SolversError as exc:
        raise ConfigError(f"FederatedConfig.budgets_file: {exc}") from None
    missing = sorted(set(range(num_clients)) - set(out))
    if missing:
        raise ConfigError(f"{path}: no budget for clients {missing[:10]}")
    extra = sorted(set(out) - set(range(num_clients)))
    if extra:
        raise ConfigError(f"{path}: client ids {extra[:10]} outside 0..{num_clients - 1} (num_clients {num_clients})")
    return out


# The calibrated memory model of the last (model structure, calibration batch, loss, optimizer) seen in this
# process. The fit is 2 + L + 2K + G measured training steps (`solvers.calibration.fit`): 37 steps for SmolLM2's
# 30 blocks, ~280 s at 2 x 128 tokens on a loaded 2-core machine; `compare` and `demo` build one trainer per
# strategy on the same model and batch, and the allocator peak does not depend on the weights' values or the strategy.
_CALIBRATED: dict[str, object] = {}


def _calibration_key(model: torch.nn.Module, layers: dict, batch: dict, head_params: list, cfg, task) -> str:
    """What the measured peaks depend on: every parameter's and buffer's name / shape / dtype / trainability (so
    the architecture and the LoRA layers), the batch's contents (a causal LM's loss keeps fp32 logits of its
    response positions only), the head, the optimizer, the backend and the task's loss."""
    import hashlib

    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad};".encode())
    for m, layer in layers.items():
        h.update(f"lora:{m}:{tuple(layer.lora_A.shape)}:{tuple(layer.lora_B.shape)}:{layer.lora_A.dtype};".encode())
    for k in sorted(batch):
        v = batch[k]
        h.update(f"batch:{k}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    h.update(f"head:{[tuple(p.shape) for p in head_params]};{cfg.optimizer};{cfg.backend};{task!r}".encode())
    h.update(type(model).__qualname__.encode())
    return h.hexdigest()


class Planner:
    """Per-client plans (module -> rank) from `solvers`, with the memory model of the shared model."""

    def __init__(self, model: torch.nn.Module, layers: dict, cfg: FederatedConfig, allocation: str,
                 calibration_batch: dict | None = None, head_params: list | None = None, *, task=None) -> None:
        """``task``: the run's `fedkernels.federated.tasks.Task`; its ``loss`` is what the memory model is calibrated
        on and importance is scored with (a causal LM's logits over the vocabulary are a large rank-independent
        term of the peak), ``calibration_batch`` its `Task.probe_batch`."""
        from fedkernels.nn import layer_index
        from solvers.memory_model import MemoryModel
        from solvers.strategies import strategy_traits

        self.cfg = cfg
        self.allocation = allocation
        self.traits = strategy_traits(allocation)
        self.layers = layers
        self.importance: dict[str, float] | None = None
        self._measured: dict[str, int] = {}
        self._fixed: dict[int, object] | None = None
        blocks = {}
        for i, m in enumerate(layers):
            idx = layer_index(m)
            blocks[m] = idx if idx is not None else i
        if calibration_batch is None:
            raise ConfigError("Planner needs a calibration batch to measure the model's training memory")
        if task is None:
            raise ConfigError("Planner needs the run's task (its loss calibrates the memory model), got None")
        self.task = task
        # Calibrated by measurement on the very model the clients train (saved-tensor hooks and the step's
        # allocator peak, `solvers.measure`), so plans are checked against the peak training really reaches.
        # Train mode: dropout masks are saved for backward during training, so calibrate with them.
        was_training = model.training
        model.train()
        key = _calibration_key(model, layers, calibration_batch, head_params or [], cfg, task)
        if key not in _CALIBRATED:
            _CALIBRATED.clear()  # one entry: a compare / demo runs strategies on one model and batch in turn
            _CALIBRATED[key] = MemoryModel.from_model(
                model, calibration_batch,
                {m: [layer.lora_A, layer.lora_B] for m, layer in layers.items()},
                blocks,
                loss_fn=task.loss,
                optimizer=cfg.optimizer,
                always_trainable=list(head_params or []),
            )
        self.memory = _CALIBRATED[key]
        margin = getattr(cfg, "memory_margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
            raise ConfigError(f"FederatedConfig.memory_margin must be a fraction in [0, 1), got {margin!r}")
        self.memory = self.memory.with_margin(float(margin))
        if self.traits.needs_importance:
            # Module values for the knapsack / FIM clusters: empirical-Fisher mass of each module's factors
            # on a probe batch, normalised to sum 1 [I]. Fed-pilot's IG-score mixes this local signal with
            # global update norms (algorithms.md sec. 1); plans are fixed after round 1 here, so only the
            # probe's Fisher term is used. At round 0 B = 0, so the mass comes from the B factors.
            from solvers.importance import fisher_scores

            scores = fisher_scores(model, [calibration_batch], {m: [l.lora_A, l.lora_B] for m, l in layers.items()},
                                   loss_fn=task.loss)
            total = sum(scores.values())
            self.importance = {m: v / total for m, v in scores.items()} if total > 0 else None
        model.train(was_training)

    # budgets ---------------------------------------------------------------
    def client_budgets(self) -> dict[int, int]:
        import solvers

        cfg = self.cfg
        if cfg.budgets is not None:
            return {i: solvers.parse_bytes(b) for i, b in enumerate(cfg.budgets)}
        if cfg.budgets_file:
            return read_budgets_csv(cfg.budgets_file, cfg.num_clients)
        lo, hi = self.memory.min_trainable_bytes(), self.memory.full_bytes()  # predicted peaks, margin included
        # tiers are fractions of the way from "one module" to "everything": 0 is the poorest feasible client
        tiers = [int(lo + f * (hi - lo)) for f in cfg.budget_tiers]
        return {i: tiers[i % len(tiers)] for i in range(cfg.num_clients)}

    def check_feasible(self, budgets: dict[int, int]) -> None:
        """Raise `solvers.errors.InfeasibleBudgetError` naming the first client that cannot train anything."""
        from solvers.errors import InfeasibleBudgetError

        if not self.traits.budgeted:
            return
        need = self.memory.min_trainable_bytes(self.memory.default_rank_choices() if self.traits.ranks else None)
        for cid, b in sorted(budgets.items()):
            if b < need:
                raise InfeasibleBudgetError(client=cid, budget=b, min_bytes=need)

    # plans -----------------------------------------------------------------
    def plans_for_round(self, round_idx: int, sampled: list[int], budgets: dict[int, int]) -> dict:
        """Plans of the sampled clients; solved once, or redrawn every round for a randomised strategy.

        Every plan's ``predicted_bytes`` is its predicted allocator peak (margin included), within budget.
        """
        from solvers.strategies import plan_clients

        randomised = self.traits.randomised
        if not randomised and self._fixed is not None and all(c in self._fixed for c in sampled):
            return {c: self._fixed[c] for c in sampled}
        seed = int(rng_for(self.cfg.seed, round_idx if randomised else 0, 0x9A7).integers(2**31))
        plans = plan_clients(
            self.allocation, self.memory, {c: budgets[c] for c in (sampled if randomised else budgets)},
            seed=seed, importance=self.importance, backend=self.cfg.planner_backend,
        )
        if not randomised:
            self._fixed = plans
        return {c: plans[c] for c in sampled}

    # measurements ----------------------------------------------------------
    @staticmethod
    def _key(plan: dict[str, int]) -> str:
        return ";".join(f"{m}={r}" for m, r in sorted(plan.items()))

    def measured(self, plan: dict[str, int]) -> int | None:
        return self._measured.get(self._key(plan))

    def record_measurement(self, plan: dict[str, int], nbytes: int) -> None:
        self._measured[self._key(plan)] = int(nbytes)

    def state_dict(self) -> dict:
        return {"measured": dict(self._measured)}

    def load_state_dict(self, state: dict) -> None:
        self._measured = dict(state.get("measured", {}))
