"""Run several strategies x partitions x seeds and summarise them as a paper-style table, CSV and plots."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.trainer import FederatedTrainer, RunSummary

__all__ = ["compare", "write_table_csv", "plot_runs"]


def compare(
    base: FederatedConfig, strategies: list[str], partitions: list[str], seeds: list[int], *, progress: bool = False,
    dataset=None,
) -> dict[tuple[str, str, int], RunSummary]:
    runs: dict[tuple[str, str, int], RunSummary] = {}
    root = Path(base.output_dir)
    for part in partitions:
        for strategy in strategies:
            for seed in seeds:
                cfg = dataclasses.replace(
                    base, strategy=strategy, partition=part, seed=seed,
                    output_dir=str(root / f"{strategy}__{part.replace(':', '-')}__seed{seed}"),
                )
                trainer = FederatedTrainer(cfg, progress=progress, dataset=dataset)
                runs[(strategy, part, seed)] = trainer.run()
                runs[(strategy, part, seed)].allocation = _allocation_matrix(trainer)
    return runs


def _allocation_matrix(trainer: FederatedTrainer) -> list[list[float]]:
    """clients x layers: share of that layer's LoRA modules (rank-weighted) the client's first plan trains."""
    from fedkernels.nn import layer_index

    names = trainer.module_names
    layers = sorted({layer_index(m) for m in names if layer_index(m) is not None})
    per_layer = {l: [m for m in names if layer_index(m) == l] for l in layers}
    plans = trainer.planner.plans_for_round(1, list(range(trainer.cfg.num_clients)), trainer.budgets)
    rmax = trainer.cfg.lora_rank
    return [
        [sum(plans[c].modules.get(m, 0) for m in per_layer[l]) / (rmax * len(per_layer[l])) for l in layers]
        for c in range(trainer.cfg.num_clients)
    ]


def summarise(runs: dict[tuple[str, str, int], RunSummary]) -> list[dict]:
    rows = []
    keys = sorted({(s, p) for s, p, _ in runs}, key=lambda k: (k[1], k[0]))
    for strategy, part in keys:
        accs = [r.final_accuracy for (s, p, _), r in runs.items() if (s, p) == (strategy, part)]
        up = [sum(h["bytes_up"] for h in r.history) for (s, p, _), r in runs.items() if (s, p) == (strategy, part)]
        rows.append({
            "strategy": strategy, "partition": part, "seeds": len(accs),
            "accuracy_mean": statistics.fmean(accs), "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "mb_up_mean": statistics.fmean(up) / 2**20,
        })
    return rows


def write_table_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_runs(runs: dict[tuple[str, str, int], RunSummary], path: Path) -> Path:
    """Left: mean held-out accuracy vs round per strategy (first partition). Right: clients x layers heat
    maps of each strategy's allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strategies = sorted({s for s, _, _ in runs})
    part = sorted({p for _, p, _ in runs})[0]
    fig, axes = plt.subplots(1, 1 + len(strategies), figsize=(4.5 * (1 + len(strategies)), 4),
                             gridspec_kw={"width_ratios": [1.6] + [1] * len(strategies)})
    ax = axes[0]
    for s in strategies:
        curves = [[h["accuracy"] for h in r.history] for (ss, p, _), r in runs.items() if ss == s and p == part]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(range(1, n + 1), mean, marker="o", label=s)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"accuracy vs round ({part})")
    ax.grid(alpha=0.3)
    ax.legend()
    for ax, s in zip(axes[1:], strategies, strict=True):
        run = next(r for (ss, p, _), r in runs.items() if ss == s and p == part)
        mat = np.asarray(getattr(run, "allocation", [[0.0]]))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{s}: trained share")
        ax.set_xlabel("layer")
        ax.set_ylabel("client")
    fig.colorbar(im, ax=axes[1:], shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
