"""Run several strategies x partitions x seeds and summarise them as a paper-style table, CSV and plots."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.trainer import FederatedTrainer, RunSummary

__all__ = ["compare", "write_table_csv", "plot_runs", "plot_curve_grid", "plot_allocation_grid"]


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
    plans = trainer.planner.plans_for_round(1, list(range(trainer.cfg.num_clients)), trainer.budgets,
                                            trainer.global_state)
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
    """Accuracy vs round per strategy (first partition) on top, a grid of clients x layers allocation heat maps
    below (4 per row, so 8+ strategies stay readable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({s for s, _, _ in runs})
    part = sorted({p for _, p, _ in runs})[0]
    curves = {s: [[h["accuracy"] for h in r.history] for (ss, p, _), r in runs.items() if ss == s and p == part]
              for s in strategies}
    maps = {s: next(r for (ss, p, _), r in runs.items() if ss == s and p == part).allocation for s in strategies}
    ncols = min(HEATMAP_COLS, len(strategies))
    nrows = math.ceil(len(strategies) / ncols)
    fig = plt.figure(figsize=(3.4 * ncols + 1.2, 4.2 + 2.8 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.5] + [1] * nrows)
    top = fig.add_subplot(grid[0, :])
    _draw_curves(top, curves, strategies, f"accuracy vs round ({part})")
    top.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    axes = [fig.add_subplot(grid[1 + i // ncols, i % ncols]) for i in range(len(strategies))]
    _draw_heatmaps(fig, axes, maps, strategies)
    return _save(fig, path)


HEATMAP_COLS = 4
_STYLES = ("-", "--", ":", "-.")


def _draw_curves(ax, curves: dict[str, list[list[float]]], order: list[str], title: str) -> None:
    """Mean over seeds of each strategy's accuracy curve (truncated to its shortest seed), tab20 colours and
    four line styles so 16 strategies stay distinguishable."""
    import matplotlib.pyplot as plt
    import numpy as np

    cmap = plt.get_cmap("tab20")
    for i, s in enumerate(order):
        runs = [c for c in curves.get(s, []) if c]
        if not runs:
            continue
        n = min(len(c) for c in runs)
        mean = 100 * np.mean([c[:n] for c in runs], axis=0)
        ax.plot(range(1, n + 1), mean, color=cmap(i % 20), linestyle=_STYLES[(i // 10) % len(_STYLES)],
                linewidth=1.6, marker="o" if n <= 10 else None, markersize=3, label=s)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _draw_heatmaps(fig, axes, maps: dict, order: list[str]) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    im = None
    for ax, s in zip(axes, order, strict=True):
        mat = maps.get(s)
        if mat is None:
            ax.set_axis_off()
            ax.set_title(f"{s}: not run", fontsize=9)
            continue
        mat = np.asarray(mat)
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("client", fontsize=8)
        ax.set_xticks(range(mat.shape[1]))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="trained share (rank-weighted)")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curve_grid(curves: dict[str, dict[str, list[list[float]]]], order: list[str], path: Path, *,
                    title: str = "") -> Path:
    """One panel per partition (2 per row), each with every strategy's mean accuracy curve; one shared legend.

    ``curves``: partition -> strategy -> per-seed accuracy lists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(curves) or ["(no runs yet)"]
    ncols = min(2, len(parts))
    nrows = math.ceil(len(parts) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols + 2.2, 4.2 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, p in zip(axes.flat, parts, strict=False):
        _draw_curves(ax, curves.get(p, {}), order, p)
    for ax in list(axes.flat)[len(parts):]:
        ax.set_axis_off()
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    ordered = [s for s in order if s in handles]
    fig.legend([handles[s] for s in ordered], ordered, loc="outside right center", fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_allocation_grid(maps: dict[str, list[list[float]]], order: list[str], path: Path, *, title: str = "",
                         ncols: int = HEATMAP_COLS) -> Path:
    """Clients x layers heat maps, ``ncols`` per row, one per strategy in ``order`` (missing ones say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [s for s in order if s not in maps]
    order = [s for s in order if s in maps] or order[:1]  # a partial suite: panels only for what has run
    if missing:
        title = f"{title}\nnot run yet: " + ",\n".join(
            ", ".join(missing[i:i + 4]) for i in range(0, len(missing), 4))
    ncols = max(1, min(ncols, len(order)))
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.3 * ncols + 1.2, 9.0), 2.9 * nrows + 0.5), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    _draw_heatmaps(fig, flat[:len(order)], maps, order)
    for ax in flat[len(order):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
