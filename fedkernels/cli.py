"""The `fedkernels` command line: demo, train, compare, plan, export, bench.

Errors: a user error (a bad config value or file, an infeasible budget, a file that cannot be read or written)
prints one line, ``error: ...`` naming the bad value, and exits with status 2. Anything else is a bug in
fedkernels: it prints one ``internal error`` line and exits with status 1. ``--verbose`` (before the command,
``fedkernels --verbose plan ...``, or the command's own ``-v``) adds the traceback in both cases.

Imports are lazy: torch and transformers load inside the commands that need them, so ``fedkernels --help``
and ``fedkernels plan --help`` start in well under a second.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from fedkernels.errors import FedKernelsError

console = Console()
err = Console(stderr=True)

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
# The --suite help names the protocols without importing fedkernels.federated.suite (it loads torch: `--help` must
# not); tests/test_cli_commands.py checks this list against `suite.PROTOCOLS`.
SUITE_NAMES = ("paper", "quick", "pilot", "tuning", "instruct", "instruct-pilot", "instruct-tuning")

_state = {"verbose": False}  # set by --verbose (global or per command); read when an error is reported


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix. Parser errors are included only when their library was
    imported: an error cannot come from a library nobody loaded, and importing it here would slow every run."""
    import json
    import tomllib

    from solvers.errors import SolversError

    kinds: list[type[BaseException]] = [FedKernelsError, SolversError, OSError, json.JSONDecodeError,
                                        tomllib.TOMLDecodeError, UnicodeDecodeError]
    if "yaml" in sys.modules:
        kinds.append(sys.modules["yaml"].YAMLError)
    return tuple(kinds)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {str(exc.filename)!r}"  # "[Errno 13] ..." adds nothing a user can act on
        if exc.filename2 is not None:
            text += f" -> {str(exc.filename2)!r}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # yaml and rich messages span lines; the promise is one line


def _report(exc: BaseException, *, user: bool | None = None) -> typer.Exit:
    """Print ``exc`` as one line on stderr (the traceback first under --verbose) and return the Exit to raise:
    status 2 for a user error, 1 for a bug."""
    if user is None:
        user = isinstance(exc, _user_errors())
    if _state["verbose"]:
        traceback.print_exception(exc, file=sys.stderr)
    if user:
        err.print(f"[bold red]error:[/] {escape(_one_line(exc))}", soft_wrap=True, highlight=False)
        return typer.Exit(2)
    hint = "" if _state["verbose"] else "; run with --verbose for the traceback"
    err.print(f"[bold red]internal error[/] ({type(exc).__name__}): {escape(_one_line(exc))}{hint}",
              soft_wrap=True, highlight=False)
    return typer.Exit(1)


class _Group(TyperGroup):
    """The one place errors are turned into exit statuses: every command runs inside `invoke` (the console
    script and typer's CliRunner alike), so no command needs its own catch-all."""

    reports_errors = True  # read by solvers.cli: mounted commands let this group report their errors

    def invoke(self, ctx: click.Context):
        _state["verbose"] = False
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own: --help, usage errors, typer.Exit from a command
        except Exception as exc:  # noqa: BLE001 - classified and reported by _report
            raise _report(exc) from None


HELP = (
    "Federated LoRA fine-tuning for clients with different memory budgets: demo, train, compare, plan, export, "
    "bench.\n\n"
    "A user error prints one line 'error: ...' and exits with status 2; an internal error (a bug) prints one "
    "line and exits with status 1; --verbose adds the traceback."
)
app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress; tracebacks on errors.")) -> None:
    if verbose:
        _state["verbose"] = True


def _fail(exc: Exception) -> None:
    """Report an error a command caught itself (always shown as a user error, exit 2)."""
    raise _report(exc, user=True)


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

    if verbose:
        _state["verbose"] = True

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", "-c", help="YAML/TOML/JSON FederatedConfig file."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder (writes only there)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in the output folder "
                                   "(its checkpoints, metrics, summary and adapter are deleted first)."),
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
            # the run continues where it is now, not in the folder its config.json names (it may have moved)
            cfg = FederatedConfig.from_file(saved).with_overrides({**overrides, "output_dir": str(resume)})
        else:
            cfg = _load_config(config, overrides)
        if engine != "inprocess":
            if resume is None:  # refuse (or clear) here: inside the ServerApp it would surface as "flwr run failed"
                from fedkernels.federated.rundir import RunDirectory

                RunDirectory(cfg.output_dir).open_fresh(overwrite=overwrite)
            summary = _run_flower(cfg, engine, resume is not None)
        else:
            trainer = FederatedTrainer(cfg, progress=sys.stderr.isatty(), overwrite=overwrite)
            summary = trainer.run(resume=resume is not None)
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)
    table = Table(title=f"{cfg.strategy} on {cfg.dataset}")
    metric = summary.metric  # the task's headline metric: accuracy, or ROUGE-L (generation rounds only)
    for col in ("round", metric, "loss", "clients ok", "MiB up", "s"):
        table.add_column(col, justify="right")
    for h in summary.history:
        table.add_row(str(h["round"]), f"{h[metric]:.3f}" if metric in h else "-",
                      f"{h['loss']:.3f}" if "loss" in h else "-",
                      f"{len(h['succeeded'])}/{len(h['sampled'])}" + (" skipped" if h["skipped"] else ""),
                      f"{h['bytes_up'] / 2**20:.2f}", f"{h['wall_s']:.1f}")
    console.print(table)
    console.print(f"metrics: {summary.output_dir / 'metrics.jsonl'}  adapter: {summary.adapter_dir}")


def _run_flower(cfg, engine: str, resume: bool):
    """Run on Flower (`fedkernels.flower.launch`) and read the run's metrics back into a RunSummary."""
    import json

    from fedkernels.federated.trainer import RunSummary, last_metric
    from fedkernels.flower import flwr_available

    if not flwr_available():
        raise FedKernelsError("--engine flower needs Flower: pip install 'fedkernels[flower]'")
    from fedkernels.flower.launch import run_in_simulation, run_local_deployment

    out = run_in_simulation(cfg, resume=resume) if engine == "flower" else run_local_deployment(cfg, resume=resume)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    adapter = out / "adapter"
    summary_path = out / "summary.json"
    metric = json.loads(summary_path.read_text()).get("metric", "accuracy") if summary_path.exists() else "accuracy"
    return RunSummary(len(history), last_metric(history, "accuracy"), last_metric(history, "loss"), history, out,
                      adapter if adapter.is_dir() else None, metric=metric,
                      final_metric=last_metric(history, metric))


def _compare_and_report(cfg, strategies, partitions, seeds, out: Path, dataset=None) -> None:
    from fedkernels.federated.compare import compare, plot_runs, summarise, write_table_csv

    runs = compare(cfg, strategies, partitions, seeds, progress=sys.stderr.isatty(), dataset=dataset)
    rows = summarise(runs)
    metric = next(iter(runs.values())).metric  # the task's headline metric (accuracy, or ROUGE-L)
    table = Table(title=f"final held-out {metric}, mean ± std over {len(seeds)} seed(s)")
    table.add_column("strategy")
    for p in partitions:
        table.add_column(p, justify="right")
    table.add_column("MiB up / run", justify="right")
    for s in strategies:
        cells = []
        for p in partitions:
            row = next(r for r in rows if r["strategy"] == s and r["partition"] == p)
            cells.append(f"{100 * row[f'{metric}_mean']:.1f} ± {100 * row[f'{metric}_std']:.1f}")
        up = next(r for r in rows if r["strategy"] == s)["mb_up_mean"]
        table.add_row(s, *cells, f"{up:.1f}")
    console.print(table)
    per_task = [k for k in rows[0] if k.startswith(("rougeL/", "exact_match/"))]  # causal-lm generation scores
    if per_task:
        detail = Table(title="last round, per task (mean over seeds)")
        for col in ("strategy", "partition", *per_task):
            detail.add_column(col, justify="right")
        for r in rows:
            detail.add_row(r["strategy"], r["partition"], *(f"{r.get(k, float('nan')):.3f}" for k in per_task))
        console.print(detail)
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
    suite: str = typer.Option(None, "--suite", help="Run a fixed protocol of fedkernels.federated.suite: "
                              f"{' | '.join(SUITE_NAMES)}. Resumable: finished runs are skipped, killed ones resume."),
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


# `fedkernels demo --task instruct`: SmolLM2-135M-Instruct on the bundled instruct-mix (BBC headline, BBC topic,
# tweet sentiment), one task per client. Measured on the shared 2-core machine at load average ~5: 28.6 min for the
# four strategies (memory-model calibration, 37 steps, ~4 min once thanks to the planner's per-process cache; a
# round's 3 clients x 3 steps of 1 x 128 tokens plus their memory measurements ~85-195 s; eval 23-117 s with
# generation), over the 15-minute target; fedpilot alone at load ~1: 6.3 min, of which calibration ~4 min and the
# two rounds 20 s + 63 s (the second with generation), so ~11 min for the four. Batch 1 x 128 tokens: 1 of
# the 300 rows is dropped (at 96 tokens 262 of 600 were). The tiers alternate so that each task is held by
# clients of two different tiers (with tiers i % 3 and tasks i % 3 every task would sit in one tier).
INSTRUCT_DEMO = {
    "model": "smollm2-135m", "dataset": "instruct-mix", "task": "causal-lm", "partition": "task",
    "num_clients": 6, "fraction": 0.5, "rounds": 2, "local_steps": 3, "batch_size": 1, "seq_len": 128,
    "lora_rank": 8, "lora_alpha": 16.0, "lr": 2e-3, "max_examples": 300, "max_eval": 24, "eval_every": 2,
    "gen_eval_per_task": 8, "max_new_tokens": 16, "budget_tiers": [0.15, 0.5, 1.0, 0.5, 1.0, 0.15],
    "output_dir": "runs/demo-instruct",
}
DEMO_STRATEGIES = {"classification": ["fedpilot", "fedit-min", "fedra"],
                   "instruct": ["fedpilot", "flexlora", "flora", "fedit-min"]}


@app.command(context_settings=EXTRA)
def demo(ctx: typer.Context, task: str = typer.Option("classification", "--task",
                                                      help="classification (MiniLM on BBC News) or instruct "
                                                           "(SmolLM2 on the bundled instruction mix)."),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """MiniLM-L6 on BBC News, 20 clients in 3 memory tiers, Dirichlet 0.5: fedpilot vs fedit-min vs fedra; with
    --task instruct, SmolLM2-135M on the instruct-mix, one task per client: fedpilot, flexlora, flora, fedit-min."""
    _setup_logging(verbose)
    from fedkernels.federated import FederatedConfig

    try:
        if task not in DEMO_STRATEGIES:
            raise FedKernelsError(f"demo --task must be one of {sorted(DEMO_STRATEGIES)}, got {task!r}")
        base = FederatedConfig(**INSTRUCT_DEMO) if task == "instruct" else FederatedConfig(output_dir="runs/demo")
        cfg = base.with_overrides(_pairs(ctx.args))
        console.print(f"[bold]fedkernels demo[/]: {cfg.model} on {cfg.dataset}, {cfg.num_clients} clients in "
                      f"{len(set(cfg.budget_tiers))} memory tiers, {cfg.partition}, {cfg.rounds} rounds")
        _compare_and_report(cfg, DEMO_STRATEGIES[task], [cfg.partition], [cfg.seed], Path(cfg.output_dir))
    except (FedKernelsError, ValueError) as exc:
        _fail(exc)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Output folder of a (possibly unfinished) training run."),
    out: Path = typer.Argument(..., help="Folder to write the peft adapter to."),
) -> None:
    """Export the latest good checkpoint of a run as a vanilla-peft adapter in OUT."""
    from fedkernels.federated import FederatedConfig, FederatedTrainer
    from fedkernels.federated.checkpoint import load_latest

    try:
        cfg = FederatedConfig.from_file(run_dir / "config.json").with_overrides({"output_dir": str(run_dir)})
        trainer = FederatedTrainer(cfg)
        _, state = load_latest(run_dir / "checkpoints", trainer._parse_state)
        trainer._load_state(state)
        path = trainer._export(out)
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
