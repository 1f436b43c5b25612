"""The `fedkernels` command line: demo, train, compare, plan, export, bench."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedkernels.errors import FedKernelsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _pairs(args: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` extra arguments as a dict of overrides."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise FedKernelsError(f"unexpected argument {a!r}; overrides look like --key value")
        key, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise FedKernelsError(f"override {a!r} has no value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _load_config(config: Path | None, overrides: dict[str, str]):
    from fedkernels.federated import FederatedConfig

    base = FederatedConfig.from_file(config) if config else FederatedConfig()
    return base.with_overrides(overrides) if overrides else base


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", "-c", help="YAML/TOML/JSON FederatedConfig file."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this output folder."),
    engine: str = typer.Option("inprocess", "--engine", help="inprocess | flower (Flower's simulation engine, "
                               "needs flwr[simulation]) | flower-local (SuperLink + SuperNodes on 127.0.0.1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one federated training. Any config field can be overridden: --rounds 3 --strategy fedra."""
    _setup_logging(verbose)
    from fedkernels.federated import FederatedConfig, FederatedTrainer

    if engine not in ("inprocess", "flower", "flower-local"):
        _fail(FedKernelsError(f"--engine must be inprocess, flower or flower-local, got {engine!r}"))

    try:
        overrides = _pairs(ctx.args)
        if resume is not None:
            saved = Path(resume) / "config.json"
            if not saved.is_file():
                raise FedKernelsError(f"--resume {str(resume)!r}: no config.json in that folder")
            cfg = FederatedConfig.from_file(saved)
            cfg = cfg.with_overrides(overrides) if overrides else cfg
        else:
            cfg = _load_config(config, overrides)
        if engine != "inprocess":
            summary = _run_flower(cfg, engine, resume is not None)
        else:
            trainer = FederatedTrainer(cfg, progress=sys.stderr.isatty())
            summary = trainer.run(resume=resume is not None)
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)
    table = Table(title=f"{cfg.strategy} on {cfg.dataset}")
    for col in ("round", "accuracy", "loss", "clients ok", "MiB up", "s"):
        table.add_column(col, justify="right")
    for h in summary.history:
        table.add_row(str(h["round"]), f"{h['accuracy']:.3f}", f"{h['loss']:.3f}",
                      f"{len(h['succeeded'])}/{len(h['sampled'])}" + (" skipped" if h["skipped"] else ""),
                      f"{h['bytes_up'] / 2**20:.2f}", f"{h['wall_s']:.1f}")
    console.print(table)
    console.print(f"metrics: {summary.output_dir / 'metrics.jsonl'}  adapter: {summary.adapter_dir}")


def _run_flower(cfg, engine: str, resume: bool):
    """Run on Flower (`fedkernels.flower.launch`) and read the run's metrics back into a RunSummary."""
    import json

    from fedkernels.federated.trainer import RunSummary
    from fedkernels.flower import flwr_available

    if not flwr_available():
        raise FedKernelsError("--engine flower needs Flower: pip install 'fedkernels[flower]'")
    from fedkernels.flower.launch import run_in_simulation, run_local_deployment

    out = run_in_simulation(cfg, resume=resume) if engine == "flower" else run_local_deployment(cfg, resume=resume)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = history[-1]
    adapter = out / "adapter"
    return RunSummary(len(history), last["accuracy"], last["loss"], history, out,
                      adapter if adapter.is_dir() else None)


def _compare_and_report(cfg, strategies, partitions, seeds, out: Path, dataset=None) -> None:
    from fedkernels.federated.compare import compare, plot_runs, summarise, write_table_csv

    runs = compare(cfg, strategies, partitions, seeds, progress=sys.stderr.isatty(), dataset=dataset)
    rows = summarise(runs)
    table = Table(title=f"final held-out accuracy, mean ± std over {len(seeds)} seed(s)")
    table.add_column("strategy")
    for p in partitions:
        table.add_column(p, justify="right")
    table.add_column("MiB up / run", justify="right")
    for s in strategies:
        cells = []
        for p in partitions:
            row = next(r for r in rows if r["strategy"] == s and r["partition"] == p)
            cells.append(f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}")
        up = next(r for r in rows if r["strategy"] == s)["mb_up_mean"]
        table.add_row(s, *cells, f"{up:.1f}")
    console.print(table)
    write_table_csv(rows, out / "compare.csv")
    png = plot_runs(runs, out / "compare.png")
    console.print(f"table: {out / 'compare.csv'}\nplot:  {png}")


@app.command(context_settings=EXTRA)
def compare(
    ctx: typer.Context,
    strategies: str = typer.Option(None, help="Comma-separated strategy presets (default fedpilot,fedit-min,fedra); "
                                   "with --suite: a subset of the suite's entries."),
    partition: str = typer.Option(None, "--partition", help="Comma-separated partitions (default dirichlet:0.5); "
                                  "with --suite: a subset of the suite's."),
    seeds: int = typer.Option(None, help="Seeds 0..N-1 per strategy and partition (default 1; with --suite: the "
                              "first N reporting seeds)."),
    config: Path = typer.Option(None, "--config", "-c"),
    suite: str = typer.Option(None, "--suite", help="Run a fixed protocol of fedkernels.federated.suite: paper | "
                              "quick | pilot. Resumable: finished runs are skipped, killed ones resume."),
    root: Path = typer.Option(None, "--root", help="--suite: folder of the run folders (default runs/suite-<name>)."),
    out: Path = typer.Option(None, "--out", help="--suite: folder for the CSV/MD/PNG reports (default --root)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="--suite: run processes at once."),
    time_budget: float = typer.Option(None, "--time-budget", help="--suite: minutes after which no new run starts."),
    report_only: bool = typer.Option(False, "--report-only", help="--suite: only write the reports."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compare strategies across partitions and seeds: a table, a CSV and a PNG plot (or a whole --suite)."""
    _setup_logging(verbose)
    split = (lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None)  # noqa: E731
    try:
        if suite is not None:
            _compare_suite(suite, ctx.args, config, split(strategies), split(partition), seeds, root, out, jobs,
                           time_budget, report_only)
            return
        cfg = _load_config(config, _pairs(ctx.args))
        _compare_and_report(cfg, split(strategies) or ["fedpilot", "fedit-min", "fedra"],
                            split(partition) or ["dirichlet:0.5"], list(range(seeds or 1)), Path(cfg.output_dir))
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)


def _compare_suite(name, extra, config, entries, partitions, seeds, root, out, jobs, time_budget, report_only):
    import shlex

    from fedkernels.federated.suite import PROTOCOLS, run_suite, write_reports

    if name not in PROTOCOLS:
        raise FedKernelsError(f"--suite {name!r}: no such suite; suites: {', '.join(PROTOCOLS)}")
    if extra or config is not None:
        raise FedKernelsError(f"--suite {name}: the protocol is fixed; drop --config/overrides {extra}")
    protocol = PROTOCOLS[name]
    protocol = protocol.restrict(entries=entries, partitions=partitions,
                                 seeds=list(protocol.seeds[:seeds]) if seeds else None)
    root = root or Path(f"runs/suite-{name}")
    if not report_only:
        outcome = run_suite(protocol, root, jobs=jobs, time_budget_s=time_budget * 60 if time_budget else None,
                            echo=console.print)
        counts = {k: sum(v == k for v in outcome.values()) for k in sorted(set(outcome.values()))}
        console.print(f"suite {name}: {counts}")
    command = "fedkernels compare " + shlex.join(a for a in sys.argv[2:] if a != "--report-only")
    for kind, path in write_reports(PROTOCOLS[name], root, out or root, command=command).items():
        console.print(f"{kind}: {path}")


@app.command(context_settings=EXTRA)
def demo(ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """MiniLM-L6 on BBC News, 20 clients in 3 memory tiers, Dirichlet 0.5: fedpilot vs fedit-min vs fedra."""
    _setup_logging(verbose)
    from fedkernels.federated import FederatedConfig

    try:
        cfg = FederatedConfig(output_dir="runs/demo").with_overrides(_pairs(ctx.args))
        console.print(f"[bold]fedkernels demo[/]: {cfg.model} on {cfg.dataset}, {cfg.num_clients} clients in "
                      f"{len(cfg.budget_tiers)} memory tiers, {cfg.partition}, {cfg.rounds} rounds")
        _compare_and_report(cfg, ["fedpilot", "fedit-min", "fedra"], [cfg.partition], [cfg.seed],
                            Path(cfg.output_dir))
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Output folder of a (possibly unfinished) training run."),
    out: Path = typer.Argument(..., help="Folder to write the peft adapter to."),
) -> None:
    """Export the latest checkpoint of a run as a vanilla-peft adapter."""
    from fedkernels.federated import FederatedConfig, FederatedTrainer
    from fedkernels.federated.checkpoint import latest_checkpoint, load_checkpoint

    try:
        cfg = FederatedConfig.from_file(run_dir / "config.json")
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise FedKernelsError(f"no checkpoint in {str(run_dir / 'checkpoints')!r}")
        trainer = FederatedTrainer(cfg)
        trainer._load_state(*load_checkpoint(ckpt))
        trainer.out = out.parent if out.name == "adapter" else out
        path = trainer._export()
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)
    console.print(f"exported round {trainer.round} to {path}")


@app.command()
def bench(
    suite: str = typer.Argument("all", help="all | lora_linear | multi_lora | aggregation | solvers"),
) -> None:
    """Run the pytest-benchmark suites in bench/ and print their tables."""
    import subprocess

    root = Path(__file__).resolve().parent.parent / "bench"
    target = str(root) if suite == "all" else str(root / f"bench_{suite}.py")
    if not Path(target).exists():
        names = ", ".join(["all"] + sorted(p.stem.removeprefix("bench_") for p in root.glob("bench_*.py")))
        _fail(FedKernelsError(f"no benchmark suite {suite!r}; available: {names}"))
    raise typer.Exit(subprocess.call([sys.executable, "-m", "pytest", target, "--benchmark-enable", "-q"]))


def _mount_plan() -> None:
    try:
        from solvers.cli import plan_command
    except ImportError:
        return
    app.command(name="plan", help="Solve memory-fitting allocation plans for clients (no model weights needed).")(
        plan_command
    )


_mount_plan()

if __name__ == "__main__":
    app()
