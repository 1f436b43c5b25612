"""``fedkernels plan`` / ``python -m solvers plan``: memory-fitting LoRA plans for clients, standalone.

No model weights and no GPU: the memory model comes from a transformers config (`MemoryModel.from_config`).
A config file (YAML, TOML or JSON) may hold every option; command-line options override it::

    model: bert-base          # preset, config.json, or a local model folder
    batch_size: 8
    seq_len: 128
    padded: true              # batches carry padding (an explicit attention mask is then saved per block)
    rank: 8
    targets: [query, value]
    strategy: fedpilot
    backend: dp
    budgets: [2GiB, 4GiB]     # or: tiers: [2GiB, 4GiB, 8GiB] with num_clients: 30 (round robin)
    dtype: bfloat16           # default: bfloat16 for models of 1B parameters and up, float32 below
    margin: 0.0               # relative safety margin on every predicted peak (allocator fragmentation)

The "predicted" column is the predicted allocator peak of one training step (forward, backward, AdamW step;
`solvers.memory_model`), margin included.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from solvers.errors import ProblemError, SolversError, os_error_naming
from solvers.units import format_bytes, parse_bytes, read_budget_csv

__all__ = ["app", "plan_command", "PlanConfig", "load_plan_config", "plot_plans"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Memory-aware LoRA allocation planner.")


@dataclass
class PlanConfig:
    """Everything `plan_command` needs; errors quote the bad value."""

    model: str = "bert-base"
    batch_size: int = 8
    seq_len: int = 128
    rank: int = 8
    targets: list[str] | None = None
    task: str = "classification"
    dtype: str | None = None
    optimizer: str = "adamw"
    num_labels: int = 2
    padded: bool = True
    strategy: str = "fedpilot"
    backend: str = "dp"
    time_limit: float | None = None
    seed: int = 0
    rank_choices: list[int] | None = None
    budgets: list[Any] | None = None
    tiers: list[Any] | None = None
    num_clients: int | None = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "rank", "num_labels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProblemError(f"{name} must be an integer >= 1, got {v!r}")
        if self.num_clients is not None and (not isinstance(self.num_clients, int) or self.num_clients < 1):
            raise ProblemError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0 <= m < 1:
            raise ProblemError(f"margin must be a fraction in [0, 1), got {m!r}")
        if isinstance(self.budgets, str | int | float):
            self.budgets = _split(self.budgets)
        if isinstance(self.tiers, str | int | float):
            self.tiers = _split(self.tiers)

    def client_budgets(self) -> dict[int, int]:
        """Client id -> bytes, from ``budgets`` (one per client, or id -> budget) or ``tiers`` x ``num_clients``."""
        if isinstance(self.budgets, dict) and self.budgets:
            return {int(c): parse_bytes(b) for c, b in self.budgets.items()}
        if self.budgets:
            return {i: parse_bytes(b) for i, b in enumerate(self.budgets)}
        if self.tiers:
            tiers = [parse_bytes(t) for t in self.tiers]
            n = self.num_clients or len(tiers)
            return {i: tiers[i % len(tiers)] for i in range(n)}
        raise ProblemError("no budgets: give --budgets 2GiB,4GiB (or a CSV file), --budget, or tiers + num_clients")


def _split(v: Any) -> list[Any]:
    if isinstance(v, int | float):
        return [v]
    return [x.strip() for x in str(v).split(",") if x.strip()]


def load_plan_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML/TOML/JSON config file into a dict of `PlanConfig` fields (unknown keys rejected)."""
    p = Path(path)
    if not p.is_file():
        raise ProblemError(f"config file {str(path)!r} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ProblemError(f"config file {str(path)!r}: expected .yaml, .yml, .toml or .json")
    except (json.JSONDecodeError, Exception) as exc:
        if isinstance(exc, ValueError) and "expected .yaml" in str(exc):
            raise
        raise ProblemError(f"config file {str(path)!r} is not valid {suffix[1:]}: {exc}") from None
    data = dict(data or {})
    if "plan" in data and isinstance(data["plan"], dict):
        data = data["plan"]
    known = {f.name for f in fields(PlanConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProblemError(f"config file {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
    return data


def _host_reports_errors() -> bool:
    """Whether the root command running us declares ``reports_errors`` (fedkernels' command group does)."""
    import click

    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and getattr(ctx.find_root().command, "reports_errors", False))


def plot_plans(plans: dict, memory, path: str | Path) -> Path:
    """PNG heat map, clients x layers: the mean planned rank of the layer's modules (0 = not trained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    clients = list(plans)
    grid = np.zeros((len(clients), memory.num_blocks))
    count = np.zeros(memory.num_blocks)
    for sp in memory.modules:
        count[sp.block] += 1
    for i, c in enumerate(clients):
        for m, r in plans[c].modules.items():
            grid[i, memory.spec(m).block] += r
    grid = grid / np.maximum(count, 1)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * memory.num_blocks + 2), max(2.5, 0.3 * len(clients) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xlabel("layer (0 = input side)")
    ax.set_ylabel("client")
    ax.set_yticks(range(len(clients)), [str(c) for c in clients])
    fig.colorbar(im, ax=ax, label="mean planned rank per module")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plan_command(
    config: Path = typer.Option(None, "--config", "-c", help="YAML/TOML/JSON file with any of the options."),
    model: str = typer.Option(None, "--model", help="Preset (bert-base, gpt2, llama-7b...), config.json or folder."),
    budgets: str = typer.Option(None, "--budgets", help="Comma list (2GiB,4GiB) or a CSV file client,budget."),
    budget: list[str] = typer.Option(None, "--budget", help="One client's budget; repeat for more clients."),
    tiers: str = typer.Option(None, "--tiers", help="Comma list of budget tiers assigned round robin."),
    num_clients: int = typer.Option(None, "--num-clients", help="Clients when using --tiers."),
    batch_size: int = typer.Option(None, "--batch-size"),
    seq_len: int = typer.Option(None, "--seq-len"),
    rank: int = typer.Option(None, "--rank"),
    targets: str = typer.Option(None, "--targets", help="Comma list of target module names."),
    strategy: str = typer.Option(None, "--strategy", help="fedpilot, fedhello-rgd:bottleneck, fedra, hetlora..."),
    backend: str = typer.Option(None, "--backend", help="dp, dp-numpy, greedy, pulp, pulp-highs, cvxpy."),
    time_limit: float = typer.Option(None, "--time-limit", help="Seconds per client (ILP backends)."),
    seed: int = typer.Option(None, "--seed"),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: bf16 from 1B params)."),
    margin: float = typer.Option(None, "--margin", help="Safety margin on predicted peaks, e.g. 0.05 (5 %)."),
    json_out: Path = typer.Option(None, "--json", help="Write the plans as JSON here."),
    png_out: Path = typer.Option(None, "--png", "--plot", help="Write a clients x layers heat map here."),
) -> None:
    """Solve memory-fitting LoRA plans for clients (no model weights needed)."""
    console = Console()
    err = Console(stderr=True)
    try:
        data = load_plan_config(config) if config is not None else {}
        over = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "rank": rank, "targets": targets,
                "strategy": strategy, "backend": backend, "time_limit": time_limit, "seed": seed, "dtype": dtype,
                "tiers": tiers, "num_clients": num_clients, "margin": margin}
        data.update({k: v for k, v in over.items() if v is not None})
        if budgets is not None:
            data["budgets"] = read_budget_csv(budgets) if Path(budgets).is_file() else _split(budgets)
        if budget:
            data["budgets"] = list(budget)
        cfg = PlanConfig(**data)
        client_budgets = cfg.client_budgets()
        from solvers.memory_model import MemoryModel
        from solvers.strategies import plan_clients

        memory = MemoryModel.from_config(cfg.model, batch_size=cfg.batch_size, seq_len=cfg.seq_len, rank=cfg.rank,
                                         targets=cfg.targets, task=cfg.task, dtype=cfg.dtype,
                                         optimizer=cfg.optimizer, num_labels=cfg.num_labels,
                                         padded=cfg.padded).with_margin(cfg.margin)
        plans = plan_clients(cfg.strategy, memory, client_budgets, seed=cfg.seed, rank_choices=cfg.rank_choices,
                             backend=cfg.backend, time_limit=cfg.time_limit)
    except (SolversError, ValueError, OSError, TypeError) as exc:
        if _host_reports_errors():
            raise  # mounted in a CLI that reports errors itself (fedkernels: one line, --verbose traceback)
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, however long
        raise typer.Exit(2) from None

    margin_note = f" + {100 * memory.margin:g} % margin" if memory.margin else ""
    table = Table(title=f"{cfg.strategy} plans for {cfg.model} (batch {cfg.batch_size} x {cfg.seq_len}, "
                        f"rank {cfg.rank}, {memory.dtype}{margin_note}); minimum peak "
                        f"{format_bytes(memory.min_trainable_bytes())}, "
                        f"full {format_bytes(memory.full_bytes())}")
    for col in ("client", "budget", "predicted peak", "modules", "layers", "objective", "status", "solve ms"):
        table.add_column(col, justify="right")
    for c, p in plans.items():
        layers = sorted({memory.spec(m).block for m in p.modules})
        shown = ",".join(map(str, layers)) if len(layers) <= 8 else f"{len(layers)}: {layers[0]}..{layers[-1]}"
        table.add_row(str(c), format_bytes(p.budget), format_bytes(p.predicted_bytes),
                      f"{len(p.modules)}/{len(memory.modules)}", shown, f"{p.objective:.3g}", str(p.status),
                      f"{1000 * p.solve_time_s:.2f}")
    console.print(table)
    if json_out is not None:
        payload = {"config": {f.name: getattr(cfg, f.name) for f in fields(PlanConfig)},
                   "memory": {"static_bytes": memory.static_bytes, "head_bytes": memory.head_bytes,
                              "block_costs": list(memory.block_costs),
                              "min_trainable_bytes": memory.min_trainable_bytes(), "full_bytes": memory.full_bytes()},
                   "plans": [p.to_dict() for p in plans.values()]}
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(payload, indent=2, default=str))
        except OSError as exc:
            raise os_error_naming(exc, json_out) from exc
        console.print(f"json: {json_out}")
    if png_out is not None:
        console.print(f"png:  {plot_plans(plans, memory, png_out)}")


app.command("plan")(plan_command)


@app.command("strategies")
def strategies_command() -> None:
    """List the allocation strategies."""
    from solvers.strategies import available_strategies

    for s in available_strategies():
        print(s)


def main() -> None:  # pragma: no cover - thin entry point
    app(sys.argv[1:])
