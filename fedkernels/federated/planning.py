"""Bridge from the trainer to `solvers`: memory model of the shared model, budgets, per-round plans."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from fedkernels.errors import ConfigError
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.data import rng_for

log = logging.getLogger("fedkernels.federated")

__all__ = ["Planner", "read_budgets_csv"]

RANDOMISED = ("fedra", "fedhello-rgd")  # allocations redrawn every round (seeded by round)


def read_budgets_csv(path: str | Path, num_clients: int) -> dict[int, int]:
    """``client,budget`` rows (budget in human units such as ``6GiB``); a header row is allowed."""
    import solvers

    out: dict[int, int] = {}
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].strip().lower() in ("client", "client_id", "id"):
                continue
            if len(row) < 2:
                raise ConfigError(f"{path}:{lineno}: expected 'client,budget', got {row!r}")
            try:
                cid = int(row[0])
            except ValueError:
                raise ConfigError(f"{path}:{lineno}: client id must be an integer, got {row[0]!r}") from None
            out[cid] = solvers.parse_bytes(row[1].strip())
    missing = sorted(set(range(num_clients)) - set(out))
    if missing:
        raise ConfigError(f"{path}: no budget for clients {missing[:10]}")
    return out


from fedkernels.federated.client import classification_loss as _classification_loss  # noqa: E402 - the one loss


class Planner:
    """Per-client plans (module -> rank) from `solvers`, with the memory model of the shared model."""

    def __init__(self, model: torch.nn.Module, layers: dict, cfg: FederatedConfig, allocation: str,
                 calibration_batch: dict | None = None, head_params: list | None = None) -> None:
        from fedkernels.nn import layer_index
        from solvers.memory import MemoryModel

        self.cfg = cfg
        self.allocation = allocation
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
        # Calibrated by measurement on the very model the clients train (saved-tensor hooks, as
        # `solvers.memory.measure` counts), so plans are checked against what training really keeps.
        # Train mode: dropout masks are saved for backward during training, so calibrate with them.
        was_training = model.training
        model.train()
        self.memory = MemoryModel.from_model(
            model, calibration_batch,
            {m: [layer.lora_A, layer.lora_B] for m, layer in layers.items()},
            blocks,
            loss_fn=_classification_loss,
            optimizer=cfg.optimizer,
            always_trainable=list(head_params or []),
        )
        if allocation.startswith(("fedpilot", "fedhello-fim")):
            # Module values for the knapsack / FIM clusters: empirical-Fisher mass of each module's factors
            # on a probe batch, normalised to sum 1 [I]. Fed-pilot's IG-score mixes this local signal with
            # global update norms (algorithms.md sec. 1); plans are fixed after round 1 here, so only the
            # probe's Fisher term is used. At round 0 B = 0, so the mass comes from the B factors.
            from solvers.importance import fisher_scores

            scores = fisher_scores(model, [calibration_batch], {m: [l.lora_A, l.lora_B] for m, l in layers.items()},
                                   loss_fn=_classification_loss)
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
        lo, hi = self.memory.min_trainable_bytes(), self.memory.full_bytes()
        # tiers are fractions of the way from "one module" to "everything": 0 is the poorest feasible client
        tiers = [int(lo + f * (hi - lo)) for f in cfg.budget_tiers]
        return {i: tiers[i % len(tiers)] for i in range(cfg.num_clients)}

    def check_feasible(self, budgets: dict[int, int]) -> None:
        """Raise `solvers.errors.InfeasibleBudgetError` naming the first client that cannot train anything."""
        from solvers.errors import InfeasibleBudgetError

        need = self.memory.min_trainable_bytes()
        for cid, b in sorted(budgets.items()):
            if b < need and self.allocation != "full":
                raise InfeasibleBudgetError(client=cid, budget=b, min_bytes=need)

    # plans -----------------------------------------------------------------
    def plans_for_round(self, round_idx: int, sampled: list[int], budgets: dict[int, int], global_state) -> dict:
        from solvers.strategies import plan_clients

        randomised = self.allocation.startswith(RANDOMISED)
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

    @staticmethod
    def tiers_summary(budgets: dict[int, int]) -> list[int]:
        return sorted(set(budgets.values()), key=int) if budgets else []

    def spread(self) -> float:
        return float(np.std(list(self._measured.values()))) if self._measured else 0.0
