"""`FederatedTrainer`: rounds of sampling, planning, local training, validation, aggregation, evaluation.

In-process simulation over one shared model: clients take turns on it, each under its own plan (which
modules it trains, at which rank) from `solvers`, and the server aggregates with a
`fedkernels.aggregation` rule. Everything random derives from (seed, round, client), so a run resumed
from a checkpoint ends bitwise identical to an uninterrupted one on the same machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedkernels.errors import CheckpointError, ConfigError, RunFailedError, RunFolderError
from fedkernels.federated import planning
from fedkernels.federated.checkpoint import RunState, load_latest, save_checkpoint
from fedkernels.federated.client import ClientResult, inject_fault, train_client
from fedkernels.federated.config import FederatedConfig
from fedkernels.federated.data import TokenizedData, load_dataset, partition, rng_for, tokenize
from fedkernels.federated.model import build_model
from fedkernels.federated.rundir import RunDirectory
from fedkernels.io import atomic_write_json
from fedkernels.nn import LoRAConfig, export_peft

__all__ = ["FederatedTrainer", "RunSummary", "PRESETS", "Prepared", "prepare"]

log = logging.getLogger("fedkernels.federated")

# strategy preset -> (allocation strategy of solvers.strategies, aggregation rule of fedkernels.aggregation)
PRESETS: dict[str, tuple[str, str]] = {
    "fedpilot": ("fedpilot", "fedpilot"),
    "fedhello": ("fedhello-rgd:bottleneck", "fedhello"),
    "fedra": ("fedra", "fedra"),
    "hetlora": ("hetlora", "hetlora"),
    "flexlora": ("flexlora", "flexlora"),
    "flora": ("hetlora", "flora"),
    "fedit-min": ("uniform-min", "fedit"),
    "fedit-full": ("full", "fedit"),
}


@dataclass
class RunSummary:
    rounds: int
    final_accuracy: float
    final_loss: float
    history: list[dict]
    output_dir: Path
    adapter_dir: Path | None
    allocation: list[list[float]] | None = None  # clients x layers trained share, filled by `compare`


def make_rule(cfg: FederatedConfig):
    """The `fedkernels.aggregation` rule of ``cfg.strategy`` with ``cfg.aggregation_options`` (the server's and,
    for a client-side loss term, every Flower client's)."""
    from fedkernels import aggregation

    return aggregation.get(PRESETS[cfg.strategy][1], **cfg.aggregation_options)


@dataclass
class Prepared:
    """What both the server and every client build from a config: model, tokenised data, splits, partitions."""

    tokenizer: object
    model: torch.nn.Module
    layers: dict
    head_name: str
    head: torch.nn.Module
    data: TokenizedData
    test_idx: np.ndarray
    train_idx: np.ndarray
    client_indices: list[np.ndarray]


def prepare(cfg: FederatedConfig, dataset=None) -> Prepared:
    """Build the seeded model, tokenise the data, hold out the test split and partition the rest over clients.

    Deterministic in ``cfg`` (and ``dataset``): a Flower SuperNode calling it gets the same model and the same
    partition as the in-process trainer.
    """
    ds = dataset if dataset is not None else load_dataset(cfg.dataset)
    num_labels = ds.features["label"].num_classes
    lora = LoRAConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), backend=cfg.backend)
    tokenizer, model, layers, head_name = build_model(cfg.model, num_labels, lora, seed=cfg.seed)
    data = tokenize(ds, tokenizer, cfg.seq_len, cfg.max_examples, seed=cfg.seed)
    labels = data.labels.numpy()
    rng = rng_for(cfg.seed, 0x7E57)
    perm = rng.permutation(len(labels))
    n_test = max(1, int(round(cfg.test_fraction * len(labels))))
    test_idx = np.sort(perm[:n_test])[: cfg.max_eval]
    train_idx = np.sort(perm[n_test:])
    parts = partition(labels[train_idx], cfg.num_clients, cfg.partition_spec(), cfg.seed)
    return Prepared(tokenizer, model, layers, head_name, model.get_submodule(head_name), data, test_idx, train_idx,
                    [train_idx[p] for p in parts])


class FederatedTrainer:
    """Run a federated LoRA fine-tuning described by a `FederatedConfig`.

    Args:
        config: the run.
        dataset: a `datasets.Dataset` with ``text`` and ``label`` to use instead of ``config.dataset``.
        fault_hook: ``hook(client_id, round, result) -> result`` applied to every client result before
            validation (tests use it to simulate bad clients; raising inside it = a crashing client).
        progress: show rich progress bars.
        overwrite: a fresh run (``run(resume=False)``) may replace the run already in ``output_dir`` (its
            checkpoints, metrics, summary and adapter are deleted first); without it that is a `RunFolderError`.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        dataset=None,
        fault_hook: Callable[[int, int, ClientResult], ClientResult] | None = None,
        progress: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.cfg = config
        self.fault_hook = fault_hook
        self.progress = progress
        self.overwrite = overwrite
        self.out = Path(config.output_dir)
        self._dataset = dataset
        self._setup()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        prep = prepare(cfg, self._dataset)
        self.tokenizer, self.model, self.layers = prep.tokenizer, prep.model, prep.layers
        self.head_name = prep.head_name
        self.head = prep.head
        self.data: TokenizedData = prep.data
        self.test_idx = prep.test_idx
        train_idx = prep.train_idx
        self.client_indices = prep.client_indices
        self.module_names = list(self.layers)
        allocation, rule_name = PRESETS[cfg.strategy]
        self.allocation = cfg.allocation or allocation
        self.rule_name = rule_name
        calib = self.data.batch(np.take(train_idx, range(cfg.batch_size), mode="wrap"))
        self.planner = planning.Planner(self.model, self.layers, cfg, self.allocation, calibration_batch=calib,
                                        head_params=list(self.head.parameters()))
        self.budgets = self.planner.client_budgets()
        self.planner.check_feasible(self.budgets)  # stops the run before round 1, naming the client
        from fedkernels import aggregation

        self.rule = make_rule(cfg)
        self.global_state = aggregation.GlobalState.from_factors(
            {m: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for m, l in self.layers.items()},
            {m: l.scale for m, l in self.layers.items()},
        )
        self.global_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        self.client_starts: dict[int, dict] = {}
        self.history: list[dict] = []
        self.round = 0

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This run's state in the checkpoint schema (`fedkernels.federated.checkpoint.RunState`)."""
        base = None
        if self.rule_name == "flora":  # FLoRA merges into the frozen base: its weights are state too
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
        expected.update({f"head.{k}": v.shape for k, v in self.head.state_dict().items()})
        return RunState.from_tensors(tensors, meta, expected=expected, source=source,
                                     base_modules=list(self.layers) if self.rule_name == "flora" else None)

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
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> RunSummary:
        """Run the remaining rounds. ``resume`` continues from the latest checkpoint in ``output_dir``.

        The loop is three steps that the Flower engine reuses around its own round trip:
        `begin_run` (restore or start the run folder), `run_round` + `commit_round` per round (metrics line,
        atomic checkpoint), `end_run` (export, summary).
        """
        cfg = self.cfg
        self.begin_run(resume=resume)
        bar = _progress(self.progress)
        with bar:
            task = bar.add_task(f"{cfg.strategy} rounds", total=cfg.rounds, completed=self.round)
            while self.round < cfg.rounds:
                record = self._run_round(self.round + 1, bar)
                self.commit_round(record)
                bar.update(task, completed=self.round,
                           description=f"{cfg.strategy} acc={record['accuracy']:.3f}")
                if stop_after is not None and self.round >= stop_after:
                    break
        return self.end_run()

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
            last = self.history[-1] if self.history else {"accuracy": float("nan"), "loss": float("nan")}
            summary = RunSummary(self.round, last["accuracy"], last["loss"], self.history, self.out, adapter_dir)
            if done:
                atomic_write_json(self.out / "summary.json", {
                    "strategy": cfg.strategy, "rounds": self.round, "final_accuracy": last["accuracy"],
                    "final_loss": last["loss"], "adapter": str(adapter_dir) if adapter_dir else None,
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

    def _run_round(self, round_idx: int, bar) -> dict:
        timings = {"plan": 0.0, "train": 0.0, "aggregate": 0.0, "eval": 0.0}
        t = time.perf_counter()
        sampled = self.sample_clients(round_idx)
        plans = self.planner.plans_for_round(round_idx, sampled, self.budgets, self.global_state)
        timings["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        results, client_log, failures = self._train_clients(round_idx, sampled, plans, bar)
        timings["train"] = time.perf_counter() - t
        return self._finish_round(round_idx, sampled, plans, results, client_log, failures, timings)

    def _train_clients(self, round_idx: int, sampled: list[int], plans: dict, bar, *, sequential: bool = False
                       ) -> tuple[list[ClientResult], list[dict], list[dict]]:
        """Local training of the sampled clients: (results, per-client log entries, failures).

        The Flower engine (`fedkernels.flower`) replaces this one method by a round trip to the SuperNodes.
        ``parallel_clients > 1`` hands the round to `fedkernels.federated.parallel` (``sequential`` forces
        one client at a time: its fallback).
        """
        cfg = self.cfg
        if cfg.parallel_clients > 1 and not sequential:
            from fedkernels.federated.parallel import train_clients_parallel

            return train_clients_parallel(self, round_idx, sampled, plans, bar)
        results: list[ClientResult] = []
        client_log: list[dict] = []
        failures: list[dict] = []
        task = bar.add_task(f"round {round_idx} clients", total=len(sampled))
        for cid in sampled:
            plan = plans[cid]
            entry = {"client": cid, "budget": self.budgets[cid], "planned_bytes": plan.predicted_bytes,
                     "modules": len(plan.modules), "ranks": sorted(set(plan.modules.values()))}
            try:
                start = self.client_starts.get(cid) or self.rule_start(cid, plan.modules)
                res = train_client(
                    client_id=cid, model=self.model, layers=self.layers, head=self.head, plan=plan.modules,
                    start=start, global_factors=self.global_state.factors, global_head=self.global_head,
                    data=self.data, indices=self.client_indices[cid], local_steps=cfg.local_steps,
                    batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    seed=cfg.seed, round_idx=round_idx,
                    measure_memory=cfg.measure_memory and not self.planner.measured(plan.modules),
                    penalty=self.rule.local_penalty(cid),
                )
                if res.measured_bytes is not None:
                    self.planner.record_measurement(plan.modules, res.measured_bytes)
                res = self._inject_fault(cid, round_idx, res)
                results.append(res)
                entry.update(status="trained", loss=res.loss, measured_bytes=self.planner.measured(plan.modules),
                             wall_s=res.wall_s)
            except Exception as exc:  # noqa: BLE001 - a crashing client is logged and excluded, the round goes on
                log.warning("round %d: client %d failed: %s: %s", round_idx, cid, type(exc).__name__, exc)
                failures.append({"client": cid, "reason": f"{type(exc).__name__}: {exc}"})
                entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            client_log.append(entry)
            bar.advance(task)
        bar.remove_task(task)
        return results, client_log, failures

    def _finish_round(self, round_idx: int, sampled: list[int], plans: dict, results: list[ClientResult],
                      client_log: list[dict], failures: list[dict], timings: dict) -> dict:
        """Aggregate the results (the rule validates them), keep the global adapter if too few succeeded,
        evaluate, and return the round's metrics record."""
        cfg = self.cfg
        t = time.perf_counter()
        from fedkernels.aggregation import ClientUpdate

        updates = [ClientUpdate(client_id=r.client_id, factors=r.factors, ranks=r.ranks, scales=r.scales,
                                num_samples=r.num_samples) for r in results]
        result = self.rule.aggregate(self.global_state, updates, {c: plans[c].modules for c in sampled})
        rejected = {e.client for e in result.rejected}
        for e in result.rejected:
            log.warning("round %d: update of client %s rejected (%s, module %s): %s", round_idx, e.client, e.reason,
                        e.module, e)
            failures.append({"client": e.client, "reason": str(e), "module": e.module})
            for entry in client_log:
                if entry["client"] == e.client:
                    entry.update(status="rejected", reason=str(e))
        good = [r for r in results if r.client_id not in rejected]
        needed = math.ceil(cfg.min_fit_fraction * len(sampled))
        skipped = len(good) < max(1, needed)
        if skipped:
            log.warning("round %d skipped: %d of %d clients succeeded, %d needed (min_fit_fraction=%s); "
                        "global adapter unchanged", round_idx, len(good), len(sampled), needed, cfg.min_fit_fraction)
        else:
            self.global_state = result.global_state
            self._apply_base_deltas(result)
            self.global_head = _weighted_head(good)
            for cid in sampled:
                if cid in rejected or all(r.client_id != cid for r in good):
                    continue
                self.client_starts.pop(cid, None)
            self.client_starts.update(self._next_starts(result, good, plans))
        timings["aggregate"] = time.perf_counter() - t

        t = time.perf_counter()
        acc, loss = self.evaluate()
        timings["eval"] = time.perf_counter() - t
        return {
            "round": round_idx,
            "strategy": cfg.strategy,
            "accuracy": acc,
            "loss": loss,
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
    def rule_start(self, cid: int, plan: dict[str, int]) -> dict:
        return self.rule.start_for(self.global_state, cid, plan)

    def _next_starts(self, result, good: list[ClientResult], plans) -> dict:
        starts = getattr(result, "client_starts", None) or {}
        return {int(c): s for c, s in starts.items()}

    def _apply_base_deltas(self, result) -> None:
        deltas = getattr(result, "base_deltas", None) or {}
        if not deltas:
            return
        from fedkernels.nn import base_weight_view
        from fedkernels.ops import merge_stacked

        with torch.no_grad():
            for m, (A_stack, B_stack, scale) in deltas.items():
                w = base_weight_view(self.layers[m].base_layer)
                merged = w.detach().clone()
                merge_stacked(merged.unsqueeze(0), A_stack.unsqueeze(0), B_stack.unsqueeze(0), scale)
                w.copy_(merged)

    def _inject_fault(self, cid: int, round_idx: int, res: ClientResult) -> ClientResult:
        res = inject_fault(self.cfg.faults.get(str(cid)), cid, res)
        if self.fault_hook is not None:
            res = self.fault_hook(cid, round_idx, res)
        return res

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Accuracy and mean loss of the global model (all adapters at full rank + global head) on the test split."""
        from fedkernels.federated.client import load_adapter_state

        load_adapter_state(self.layers, self.global_state.factors)
        self.head.load_state_dict(self.global_head)
        self.model.eval()
        correct, total_loss = 0, 0.0
        for lo in range(0, len(self.test_idx), 64):
            batch = self.data.batch(self.test_idx[lo: lo + 64])
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            total_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        n = len(self.test_idx)
        return correct / n, total_loss / n

    def _export(self, target: Path | None = None) -> Path | None:
        """The global adapter as a peft folder: ``target`` (default ``output_dir/adapter``)."""
        from fedkernels.federated.client import load_adapter_state

        load_adapter_state(self.layers, self.global_state.factors)
        self.head.load_state_dict(self.global_head)
        target = Path(target) if target is not None else self.out / "adapter"
        try:
            export_peft(self.model, target, base_model_name_or_path=self.cfg.model)
        except Exception as exc:  # noqa: BLE001 - e.g. FLoRA: everything merged, nothing left to export
            log.info("no peft adapter exported: %s", exc)
            return None
        if self.rule_name == "flora":
            from fedkernels.io import atomic_save_safetensors

            atomic_save_safetensors({m: l.base_layer.weight for m, l in self.layers.items()},
                                    self.out / "merged_base_weights.safetensors")
        return target


def _weighted_head(results: list[ClientResult]) -> dict[str, torch.Tensor]:
    """FedAvg of the classification head over the clients that succeeded, weights ∝ samples."""
    total = sum(r.num_samples for r in results)
    keys = results[0].head.keys()
    return {k: sum(r.head[k].double() * (r.num_samples / total) for r in results).to(results[0].head[k].dtype)
            for k in keys}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


