"""`FederatedTrainer`: rounds of sampling, planning, local training, validation, aggregation, evaluation.

In-process simulation over one shared model: clients take turns on it, each under its own plan (which
modules it trains, at which rank) from `solvers`, and the server aggregates with a
`fedkernels.aggregation` rule. Everything random derives from (seed, round, client), so a run resumed
from a checkpoint ends bitwise identical to an uninterrupted one on the same machine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedkernels.errors import CheckpointError, ClientUpdateError, ConfigError, RunFailedError, RunFolderError
from fedkernels.federated import planning
from fedkernels.federated.checkpoint import RunState, load_latest, save_checkpoint
from fedkernels.federated.client import ClientResult, LocalTraining, SharedModel, fault_injector
from fedkernels.federated.config import PRESETS, FederatedConfig
from fedkernels.federated.data import TokenizedData, load_dataset, partition, rng_for
from fedkernels.federated.executor import ClientExecutor, ParallelExecutor, RoundJob, RoundOutcome, SequentialExecutor
from fedkernels.federated.rundir import RunDirectory
from fedkernels.federated.tasks import Task, task_from_config
from fedkernels.io import atomic_write_json
from fedkernels.nn import LoRAConfig, export_peft

__all__ = ["FederatedTrainer", "RunSummary", "Prepared", "prepare", "make_rule", "head_errors"]

log = logging.getLogger("fedkernels.federated")


@dataclass
class RunSummary:
    """``final_accuracy``: the last round's accuracy (NaN for a task without it); ``metric`` names the task's
    headline metric (`Task.headline_metric`) and ``final_metric`` its last value (NaN if never evaluated)."""

    rounds: int
    final_accuracy: float
    final_loss: float
    history: list[dict]
    output_dir: Path
    adapter_dir: Path | None
    allocation: list[list[float]] | None = None  # clients x layers trained share, filled by `compare`
    metric: str = "accuracy"
    final_metric: float = float("nan")

    def __post_init__(self) -> None:
        if self.metric == "accuracy" and math.isnan(self.final_metric):  # a summary built with accuracy only
            self.final_metric = self.final_accuracy


def last_metric(history: list[dict], name: str) -> float:
    """The latest value of ``name`` in the metrics records (generation metrics are not in every round's)."""
    for h in reversed(history):
        if name in h:
            return float(h[name])
    return float("nan")


def make_rule(cfg: FederatedConfig):
    """The `fedkernels.aggregation` rule of ``cfg.strategy`` with ``cfg.aggregation_options`` (the server's and,
    for a client-side loss term, every Flower client's)."""
    from fedkernels import aggregation

    return aggregation.get(PRESETS[cfg.strategy].rule, **cfg.aggregation_options)


@dataclass
class Prepared:
    """What both the server and every client build from a config: model, tokenised data, splits, partitions."""

    tokenizer: object
    model: torch.nn.Module
    layers: dict
    head_name: str | None
    head: torch.nn.Module | None
    data: TokenizedData
    test_idx: np.ndarray
    train_idx: np.ndarray
    client_indices: list[np.ndarray]
    task: Task

    @property
    def shared(self) -> SharedModel:
        """The model and data the clients train on."""
        return SharedModel(self.model, self.layers, self.head_name, self.data)


def prepare(cfg: FederatedConfig, dataset=None) -> Prepared:
    """Build the seeded model, tokenise the data, hold out the test split and partition the rest over clients.

    Deterministic in ``cfg`` (and ``dataset``): a Flower SuperNode calling it gets the same model and the same
    partition as the in-process trainer.
    """
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, task=cfg.task, columns=cfg.columns)
    task = task_from_config(cfg, ds.column_names)
    lora = LoRAConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, backend=cfg.backend)
    targets = list(cfg.lora_targets) if cfg.lora_targets else None
    tokenizer, model, layers, head_name = task.build_model(cfg.model, lora, seed=cfg.seed,
                                                           num_labels=task.num_labels(ds), targets=targets)
    data = task.tokenize(ds, tokenizer, cfg.seq_len, cfg.max_examples, seed=cfg.seed)
    labels = task.partition_labels(data)
    rng = rng_for(cfg.seed, 0x7E57)
    perm = rng.permutation(len(labels))
    n_test = max(1, int(round(cfg.test_fraction * len(labels))))
    test_idx = task.held_out(perm[:n_test], labels, cfg.max_eval)
    train_idx = np.sort(perm[n_test:])
    parts = partition(labels[train_idx], cfg.num_clients, cfg.partition_spec(), cfg.seed)
    head = None if head_name is None else model.get_submodule(head_name)
    return Prepared(tokenizer, model, layers, head_name, head, data, test_idx, train_idx,
                    [train_idx[p] for p in parts], task)


class FederatedTrainer:
    """Run a federated LoRA fine-tuning described by a `FederatedConfig`.

    Args:
        config: the run (never mutated: `set_rounds` replaces the trainer's own copy).
        dataset: a `datasets.Dataset` with ``text`` and ``label`` to use instead of ``config.dataset``.
        fault_hook: ``hook(client_id, round, result) -> result`` applied to every client result before
            validation (tests use it to simulate bad clients; raising inside it = a crashing client).
        progress: show rich progress bars.
        overwrite: a fresh run (``run(resume=False)``) may replace the run already in ``output_dir`` (its
            checkpoints, metrics, summary and adapter are deleted first); without it that is a `RunFolderError`.
        executor: who trains the clients (`fedkernels.federated.executor`); default: `SequentialExecutor`, or
            `ParallelExecutor` when ``config.parallel_clients > 1``.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        dataset=None,
        fault_hook: Callable[[int, int, ClientResult], ClientResult] | None = None,
        progress: bool = False,
        overwrite: bool = False,
        executor: ClientExecutor | None = None,
    ) -> None:
        self.cfg = config
        self.fault_hook = fault_hook
        self.progress = progress
        self.overwrite = overwrite
        self.out = Path(config.output_dir)
        self._dataset = dataset
        self._setup()
        self.settings = LocalTraining.from_config(config, task=self.task)
        self.executor = executor if executor is not None else self._default_executor()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        prep = prepare(cfg, self._dataset)
        self.tokenizer, self.model, self.layers = prep.tokenizer, prep.model, prep.layers
        self.task = prep.task
        self.head_name = prep.head_name
        self.head = prep.head
        self.shared = prep.shared
        self.data: TokenizedData = prep.data
        self.test_idx = prep.test_idx
        train_idx = prep.train_idx
        self.client_indices = prep.client_indices
        self.module_names = list(self.layers)
        preset = PRESETS[cfg.strategy]
        self.allocation = cfg.allocation or preset.allocation
        self.rule_name = preset.rule
        calib = self.task.probe_batch(self.data, train_idx, cfg.batch_size)
        self.planner = planning.Planner(self.model, self.layers, cfg, self.allocation, calibration_batch=calib,
                                        head_params=[] if self.head is None else list(self.head.parameters()),
                                        task=self.task)
        self.budgets = self.planner.client_budgets()
        self.planner.check_feasible(self.budgets)  # stops the run before round 1, naming the client
        self.configured_budgets = dict(self.budgets)  # the config's; an executor may report others per round
        from fedkernels import aggregation

        self.rule = make_rule(cfg)
        self.global_state = aggregation.GlobalState.from_factors(
            {m: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for m, l in self.layers.items()},
            {m: l.scale for m, l in self.layers.items()},
        )
        self.global_head = {} if self.head is None else {k: v.detach().clone()
                                                         for k, v in self.head.state_dict().items()}
        self.client_starts: dict[int, dict] = {}
        self.history: list[dict] = []
        self.round = 0

    def _default_executor(self) -> ClientExecutor:
        sequential = SequentialExecutor(self.shared, self.settings)
        if self.cfg.parallel_clients > 1:
            return ParallelExecutor(self.shared, self.settings, self.cfg.parallel_clients, fallback=sequential)
        return sequential

    def set_rounds(self, rounds: int) -> None:
        """Run to ``rounds`` rounds instead of ``config.rounds`` (the trainer's copy of the config is replaced, the
        caller's config object is left alone). Raises `ConfigError` for a non-positive count."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
        if rounds != self.cfg.rounds:
            self.cfg = dataclasses.replace(self.cfg, rounds=rounds)

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This run's state in the checkpoint schema (`fedkernels.federated.checkpoint.RunState`)."""
        base = None
        if self.rule.mutates_base:  # FLoRA merges into the frozen base: its weights are state too
            base = {m: layer.base_layer.weight.detach() for m, layer in self.layers.items()}
        return RunState(
            round=self.round, config=self.cfg.to_dict(), factors=dict(self.global_state.factors),
            head=self.global_head, rule_state=self.global_state.state_dict(), rng=torch.get_rng_state(),
            planner=self.planner.state_dict(), budgets=self.budgets, base=base, starts=self.client_starts,
        ).to_tensors()

    def _parse_state(self, tensors: dict[str, torch.Tensor], meta: dict, source: str | Path = "checkpoint"
                     ) -> RunState:
        """A loaded checkpoint checked against this model (every key, shape, finite values, round range)."""
        expected = {}
        for m, layer in self.layers.items():
            expected[f"global.{m}.A"] = layer.lora_A.shape
            expected[f"global.{m}.B"] = layer.lora_B.shape
        expected.update({f"head.{k}": v.shape for k, v in self.global_head.items()})
        return RunState.from_tensors(tensors, meta, expected=expected, source=source,
                                     base_modules=list(self.layers) if self.rule.mutates_base else None)

    def _load_state(self, tensors: dict[str, torch.Tensor] | RunState, meta: dict | None = None) -> None:
        """Restore a checkpoint: a checked `RunState`, or raw ``(tensors, meta)`` (checked here)."""
        from fedkernels import aggregation

        st = tensors if isinstance(tensors, RunState) else self._parse_state(tensors, meta)
        scales = {m: layer.scale for m, layer in self.layers.items()}
        self.global_state = aggregation.GlobalState.from_factors(st.factors, scales)
        self.global_state.load_state_dict(st.rule_state)
        self.global_head = dict(st.head)
        if st.base is not None:
            with torch.no_grad():
                for m, layer in self.layers.items():
                    layer.base_layer.weight.copy_(st.base[m])
        torch.set_rng_state(st.rng)
        self.client_starts = st.starts
        self.planner.load_state_dict(st.planner)
        self.round = st.round

    # ------------------------------------------------------------------ run
    def run(self, *, resume: bool = False, stop_after: int | None = None, rounds: int | None = None) -> RunSummary:
        """Run the remaining rounds. ``resume`` continues from the latest checkpoint in ``output_dir``; ``rounds``
        overrides ``config.rounds`` (`set_rounds`); ``stop_after`` stops after that round without the export.

        The loop is three steps that the Flower engine reuses around its own round trip:
        `begin_run` (restore or start the run folder), `plan_round` + executor + `finish_round` (= `_run_round`)
        and `commit_round` per round (metrics line, atomic checkpoint), `end_run` (export, summary).
        """
        if rounds is not None:
            self.set_rounds(rounds)
        self.begin_run(resume=resume)
        bar = _progress(self.progress)
        with bar:
            task = bar.add_task(f"{self.cfg.strategy} rounds", total=self.cfg.rounds, completed=self.round)
            while self.round < self.cfg.rounds:
                record = self._run_round(self.round + 1, bar)
                self.commit_round(record)
                bar.update(task, completed=self.round, description=f"{self.cfg.strategy} {self.headline(record)}")
                if stop_after is not None and self.round >= stop_after:
                    break
        return self.end_run()

    def headline(self, record: dict) -> str:
        """``loss=... <headline metric>=...`` of a metrics record (the metric only on rounds that computed it)."""
        name = self.task.headline_metric
        text = f"loss={record['loss']:.3f}" if "loss" in record else "not evaluated"
        return text + (f" {name}={record[name]:.3f}" if name in record else "")

    def begin_run(self, *, resume: bool = False) -> None:
        """Open the run folder (`fedkernels.federated.rundir.RunDirectory`): take its lock, delete stale temp
        files, then restore the newest good checkpoint (``resume``) or start fresh (refused in a folder holding
        another run unless ``overwrite``); rewrite the metrics file to exactly the rounds the state covers (a
        killed run may have logged one more)."""
        cfg = self.cfg
        self.rundir = RunDirectory(self.out)
        self.rundir.acquire()
        try:
            self.rundir.clean_temp()
            if resume:
                self._resume()
            else:
                self.rundir.open_fresh(overwrite=self.overwrite)
            self.rundir.write_metrics(self.history)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
        except BaseException:
            self.rundir.release()
            raise

    def _resume(self) -> None:
        cfg = self.cfg
        ckpt_root = self.rundir.checkpoints
        if not ckpt_root.is_dir():
            raise RunFolderError(f"--resume: no checkpoints folder in {str(self.out)!r}")

        def check(tensors: dict, meta: dict, folder: Path) -> RunState:
            st = self._parse_state(tensors, meta, folder)
            if st.round > cfg.rounds:
                raise CheckpointError(f"{str(folder)!r} is at round {st.round}, beyond rounds={cfg.rounds}")
            return st

        ckpt, state = load_latest(ckpt_root, check)
        # output_dir may differ (a moved or copied run resumes where it is now) and rounds may be extended
        same = ("rounds", "output_dir")
        if {k: v for k, v in FederatedConfig.from_dict(state.config).to_dict().items() if k not in same} != {
                k: v for k, v in cfg.to_dict().items() if k not in same}:
            raise ConfigError(f"--resume: the config differs from the checkpointed run in {str(ckpt)!r}")
        self._load_state(state)
        history = self.rundir.read_metrics()
        self.history = [h for h in history if h["round"] <= self.round]
        if [h["round"] for h in self.history] != list(range(1, self.round + 1)):
            log.warning("%s covers rounds %s, the checkpoint %s is at round %d: the summary totals cover only "
                        "the logged rounds", self.rundir.metrics_path, [h["round"] for h in self.history], ckpt,
                        self.round)
        log.info("resumed from %s at round %d", ckpt, self.round)

    def commit_round(self, record: dict) -> None:
        """Make a finished round durable: advance ``round``, rewrite the metrics file (atomically), write the
        checkpoint. A crash in between leaves metrics one round ahead of the checkpoint, which resume trims."""
        self.round = int(record["round"])
        self.history.append(record)
        self.rundir.write_metrics(self.history)
        tensors, meta = self._state_tensors()
        save_checkpoint(self.rundir.checkpoints, self.round, tensors, meta)

    def end_run(self) -> RunSummary:
        """Export the adapter and write summary.json once every round is done; release the run folder; the run's
        summary either way.

        Raises:
            RunFailedError: every round is done and not one client update succeeded in any of them (summary.json
                is written first, with ``"failed": true``).
        """
        cfg = self.cfg
        try:
            done = self.round >= cfg.rounds
            failed = done and bool(self.history) and not any(h["succeeded"] for h in self.history)
            adapter_dir = self._export() if done and not failed else None
            metric = self.task.headline_metric
            # the last evaluated round's values (rounds off the eval_every schedule log no metric)
            summary = RunSummary(self.round, last_metric(self.history, "accuracy"),
                                 last_metric(self.history, "loss"), self.history, self.out, adapter_dir,
                                 metric=metric, final_metric=last_metric(self.history, metric))
            if done:
                atomic_write_json(self.out / "summary.json", {
                    "strategy": cfg.strategy, "rounds": self.round, "task": self.task.name,
                    "final_accuracy": summary.final_accuracy, "final_loss": summary.final_loss,
                    "metric": metric, "final_metric": summary.final_metric,
                    "adapter": str(adapter_dir) if adapter_dir else None,
                    "failed": failed,
                    "total_bytes_up": sum(h["bytes_up"] for h in self.history),
                    "total_bytes_down": sum(h["bytes_down"] for h in self.history),
                })
        finally:
            if getattr(self, "rundir", None) is not None:
                self.rundir.release()
        if failed:
            first = next((f for h in self.history for f in h["failures"]), {"reason": "no client was sampled"})
            raise RunFailedError(f"every client failed in every one of {self.round} rounds (first: client "
                                 f"{first.get('client')}: {first['reason']}); see {str(self.out / 'summary.json')!r}")
        return summary

    def sample_clients(self, round_idx: int) -> list[int]:
        n = self.cfg.num_clients
        m = max(1, int(round(self.cfg.fraction * n)))
        return sorted(rng_for(self.cfg.seed, round_idx, 0x5A3).choice(n, size=m, replace=False).tolist())

    def plan_round(self, round_idx: int) -> RoundJob:
        """Everything the clients of round ``round_idx`` need: sampled clients, budgets (the executor's), plans,
        start factors, the rule's loss terms, which clients measure their memory, fault injection."""
        cfg = self.cfg
        sampled = self.sample_clients(round_idx)
        budgets = self.executor.round_budgets(round_idx, self.configured_budgets, self.planner.check_feasible)
        if budgets != self.budgets:
            self.budgets = dict(budgets)
            self.planner._fixed = None  # the cached fixed plans were solved for the old budgets
        plans = self.planner.plans_for_round(round_idx, sampled, self.budgets)
        measure, seen = set(), set()
        for cid in sampled:  # the first client of each unmeasured plan measures it (its own step, so sequential)
            key = tuple(sorted(plans[cid].modules.items()))
            if cfg.measure_memory and key not in seen and self.planner.measured(plans[cid].modules) is None:
                measure.add(cid)
            seen.add(key)
        return RoundJob(
            round_idx=round_idx,
            sampled=sampled,
            plans={c: plans[c] for c in sampled},
            budgets={c: self.budgets[c] for c in sampled},
            starts={c: self.client_starts.get(c) or self.rule.start_for(self.global_state, c, plans[c].modules)
                    for c in sampled},
            global_factors=self.global_state.factors,
            global_head=self.global_head,
            scales=dict(self.global_state.scales),
            indices={c: self.client_indices[c] for c in sampled},
            penalties={c: self.rule.local_penalty(c) for c in sampled},
            measure=frozenset(measure),
            inject_fault=fault_injector(cfg.faults, round_idx, self.fault_hook),
            base_weights=({m: layer.base_layer.weight for m, layer in self.layers.items()}
                          if self.rule.mutates_base else None),
        )

    def _run_round(self, round_idx: int, bar) -> dict:
        """One round in-process: `plan_round`, the executor's `train`, `finish_round`; the metrics record."""
        t = time.perf_counter()
        job = self.plan_round(round_idx)
        timings = {"plan": time.perf_counter() - t}
        t = time.perf_counter()
        task = bar.add_task(f"round {round_idx} clients", total=len(job.sampled))
        outcome = self.executor.train(job, lambda n: bar.advance(task, n))
        bar.remove_task(task)
        timings["train"] = time.perf_counter() - t
        return self.finish_round(job, outcome, timings)

    def finish_round(self, job: RoundJob, outcome: RoundOutcome, timings: dict | None = None) -> dict:
        """Validate the results (heads here, factors in the rule), aggregate, keep the global adapter if too few
        succeeded, evaluate; the round's metrics record (`commit_round` makes it durable)."""
        cfg = self.cfg
        timings = {"plan": 0.0, "train": 0.0, **(timings or {})}
        round_idx, sampled = job.round_idx, job.sampled
        client_log, failures = outcome.client_log, list(outcome.failures)
        for cid, nbytes in outcome.measurements.items():
            self.planner.record_measurement(job.plans[cid].modules, nbytes)
        for entry in client_log:
            if entry.get("status") == "trained":
                entry["measured_bytes"] = self.planner.measured(job.plans[entry["client"]].modules)
        t = time.perf_counter()
        from fedkernels.aggregation import ClientUpdate

        head_rejected = [e for r in outcome.results for e in head_errors(r, self.global_head, self.head_name)]
        bad_head = {e.client for e in head_rejected}
        candidates = [r for r in outcome.results if r.client_id not in bad_head]
        updates = [ClientUpdate(client_id=r.client_id, factors=r.factors, ranks=r.ranks, scales=r.scales,
                                num_samples=r.num_samples) for r in candidates]
        result = self.rule.aggregate(self.global_state, updates, {c: job.plans[c].modules for c in sampled})
        rejections = head_rejected + list(result.rejected)
        rejected = {e.client for e in rejections}
        for e in rejections:
            log.warning("round %d: update of client %s rejected (%s, module %s): %s", round_idx, e.client, e.reason,
                        e.module, e)
            failures.append({"client": e.client, "reason": str(e), "module": e.module})
            for entry in client_log:
                if entry["client"] == e.client:
                    entry.update(status="rejected", reason=str(e))
        good = [r for r in candidates if r.client_id not in rejected]
        needed = math.ceil(cfg.min_fit_fraction * len(sampled))
        skipped = len(good) < max(1, needed)
        if skipped:
            log.warning("round %d skipped: %d of %d clients succeeded, %d needed (min_fit_fraction=%s); "
                        "global adapter unchanged", round_idx, len(good), len(sampled), needed, cfg.min_fit_fraction)
        else:
            self.global_state = result.global_state
            # an adaptive allocation's importance follows the rule's aggregated update norms (next round's plans)
            self.planner.observe_updates(result.global_state.extra.get("update_norms") or {})
            self._apply_base_deltas(result)
            self.global_head = _head_step(self.global_head, _weighted_head(good), self.rule.head_step)
            for r in good:
                self.client_starts.pop(r.client_id, None)
            self.client_starts.update({int(c): s for c, s in result.client_starts.items()})
        timings["aggregate"] = time.perf_counter() - t

        t = time.perf_counter()
        scheduled = cfg.evaluates_at(round_idx)  # the one schedule (eval_every, eval_last) for every task
        if scheduled or self.task.evaluates_every_round:
            metrics = self.evaluate(generate=scheduled and self.task.generates)
        else:
            metrics = {}  # off the eval_every schedule: the record has no metric (compare/suite draw logged rounds)
        timings["eval"] = time.perf_counter() - t
        results = outcome.results
        return {
            "round": round_idx,
            "strategy": cfg.strategy,
            **metrics,
            "skipped": skipped,
            "sampled": sampled,
            "succeeded": [r.client_id for r in good],
            "failures": failures,
            "notes": list(result.notes),
            "bytes_up": int(sum(r.bytes_up for r in results)),
            "bytes_down": int(sum(r.bytes_down for r in results)),
            "clients": client_log,
            "timings": timings,
            "wall_s": sum(timings.values()),
        }

    # ------------------------------------------------------------------ pieces
    def _apply_base_deltas(self, result) -> None:
        if not result.base_deltas:
            return
        from fedkernels.nn import base_weight_view
        from fedkernels.ops import merge_stacked

        with torch.no_grad():
            for m, (A_stack, B_stack, scale) in result.base_deltas.items():
                w = base_weight_view(self.layers[m].base_layer)
                merged = w.detach().clone()
                merge_stacked(merged.unsqueeze(0), A_stack.unsqueeze(0), B_stack.unsqueeze(0), scale)
                w.copy_(merged)

    @torch.no_grad()
    def evaluate(self, *, generate: bool = False) -> dict[str, float]:
        """The task's metrics (`Task.evaluate`: accuracy and loss; or loss, perplexity and, with ``generate``,
        ROUGE-L / exact match per task and macro) of the global model (all adapters at full rank + the global head)
        on the test split."""
        self._load_global()
        return self.task.evaluate(self.model, self.data, self.test_idx, generate=generate)

    def _load_global(self) -> None:
        from fedkernels.federated.client import load_adapter_state

        load_adapter_state(self.layers, self.global_state.factors)
        if self.head is not None:
            self.head.load_state_dict(self.global_head)
        self.model.eval()

    def _export(self, target: Path | None = None) -> Path | None:
        """The peft adapter in ``target`` (default ``output_dir/adapter``); under a rule that `mutates_base` (FLoRA)
        also the merged base weights in ``merged_base_weights.safetensors`` beside ``adapter/`` (inside
        ``target`` when one is given), written first: without them the adapter does not reproduce the model, and
        with B = 0 after FLoRA's restart there may be no adapter to export at all."""
        self._load_global()
        target = Path(target) if target is not None else self.out / "adapter"
        if self.rule.mutates_base:
            from fedkernels.io import atomic_save_safetensors

            base_dir = self.out if target == self.out / "adapter" else target
            atomic_save_safetensors({m: l.base_layer.weight for m, l in self.layers.items()},
                                    base_dir / "merged_base_weights.safetensors")
        try:
            export_peft(self.model, target, base_model_name_or_path=self.cfg.model, task_type=self.task.peft_task_type)
        except Exception as exc:  # noqa: BLE001 - e.g. FLoRA: everything merged, nothing left to export
            log.info("no peft adapter exported: %s", exc)
            return None
        return target


def head_errors(res: ClientResult, global_head: dict[str, torch.Tensor], head_name: str = "head"
                ) -> list[ClientUpdateError]:
    """Problems of a client's classification head (every ``modules_to_save`` tensor) against the global head:
    the same keys, each tensor of the global shape and kind (floating point or not) and finite, as the aggregation
    rule checks the factors. Empty list: the head is usable."""
    from fedkernels.aggregation.base import _non_finite

    cid = res.client_id
    errs = []
    keys, want = set(res.head), set(global_head)
    if keys != want:
        errs.append(ClientUpdateError(f"client {cid}: head {head_name!r} has keys {sorted(keys - want)} not in the "
                                      f"global head and lacks {sorted(want - keys)}", client=cid, module=head_name,
                                      reason="unknown_key"))
    for k in sorted(keys & want):
        t, g, name = res.head[k], global_head[k], f"{head_name}.{k}"
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(g.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            errs.append(ClientUpdateError(f"client {cid}: head tensor {name!r} has shape {got}, expected "
                                          f"{tuple(g.shape)}", client=cid, module=name, reason="shape"))
        elif t.is_floating_point() != g.is_floating_point():
            errs.append(ClientUpdateError(f"client {cid}: head tensor {name!r} has dtype {t.dtype}, the global "
                                          f"head's is {g.dtype}", client=cid, module=name, reason="dtype"))
        elif bad := _non_finite(t):
            errs.append(ClientUpdateError(f"client {cid}: head tensor {name!r} has {bad} non-finite (NaN/Inf) "
                                          "entries", client=cid, module=name, reason="non_finite"))
    return errs


def _weighted_head(results: list[ClientResult]) -> dict[str, torch.Tensor]:
    """FedAvg of the classification head over the clients that succeeded, weights ∝ samples."""
    total = sum(r.num_samples for r in results)
    keys = results[0].head.keys()
    return {k: sum(r.head[k].double() * (r.num_samples / total) for r in results).to(results[0].head[k].dtype)
            for k in keys}


def _head_step(old: dict[str, torch.Tensor], avg: dict[str, torch.Tensor], step: float) -> dict[str, torch.Tensor]:
    """``old + step * (avg - old)`` per tensor (fp64 arithmetic); ``step == 1`` returns ``avg`` itself."""
    if step == 1.0 or not old:
        return avg
    return {k: (old[k].double() + step * (v.double() - old[k].double())).to(v.dtype) for k, v in avg.items()}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


