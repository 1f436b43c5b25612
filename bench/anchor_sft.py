"""Anchor comparison (issue 14 item 7): one federated SFT workload run our way and the FlowerTune / OpenFedLLM way.

The reference side ("peft/FedAvg") does what those frameworks do: every client builds its own model and wraps it
with peft's ``get_peft_model`` (FlowerTune's ClientApp builds the model in every ``client_fn`` call), loads the
global adapter with ``set_peft_model_state_dict``, trains every LoRA module (no memory-aware plan) and sends
``get_peft_model_state_dict`` back; the server takes the FedAvg of those state dicts, each key weighted by the
client's sample count over the clients of the round (OpenFedLLM ``global_aggregate``'s default branch). The
local loop is a plain AdamW loop rather than TRL's SFTTrainer so that both sides step on identical batches.

Our side is `fedkernels.federated.trainer.FederatedTrainer` on the causal-LM task, with ``fedit-full`` (every
module at full rank, FedAvg of A and B: the like-for-like setting) and optionally memory-aware presets.

Held equal on both sides, in the same process:

- model and base weights (``tiny-llama`` random init from the same seed, or the cached SmolLM2 safetensors);
- data: the bundled ``instruct-mix`` tokenised once by `CausalLMTask` (prompt masking, seq_len), one held-out
  split, the ``task`` partition, the sampled clients of each round and every client's batches
  (`fedkernels.federated.client.client_order` / ``step_indices``: both sides draw the very same rows);
- lr, local steps, batch, rank, alpha, targets, LoRA dropout 0, a fresh AdamW per client per round;
- the initial adapter (``--init shared``: peft starts from our initial factors, so with ``fedit-full`` the two
  runs compute the same algorithm and their final adapters should agree to float rounding);
- the scoring: `CausalLMTask.evaluate` (held-out loss, greedy generation, ROUGE-L and exact match).

Measured: wall time per round (sampling/planning, local training of every sampled client, aggregation; the
evaluation is outside it), rounds interleaved between the sides so a slow phase of the shared machine hits
both; per-client training memory: `solvers.measure.measure_peak` (allocator peak of one steady-state step:
CPU torch.profiler memory events, CUDA max_memory_allocated) on each client's first batch, the same batch for
both sides; final ROUGE-L. Ratios are ours / peft.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/anchor_sft.py [--quick]``; writes
``bench/results/<device>-anchor.json`` (``-anchor-quick.json`` with ``--quick``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS_DIR, cpu_threads, device_name  # noqa: E402
from fedkernels.federated.client import client_order, load_adapter_state, step_indices  # noqa: E402
from fedkernels.federated.data import load_dataset, partition, rng_for  # noqa: E402
from fedkernels.federated.tasks import CausalLMTask  # noqa: E402
from solvers.measure import measure_peak  # noqa: E402

__all__ = ["Workload", "Split", "PeftFedAvg", "run", "main", "QUICK", "FULL"]

MiB = 2**20
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Workload:
    """The federated SFT run both sides execute. ``targets``: LoRA target modules (Llama: q_proj, v_proj)."""

    model: str = "smollm2-135m"
    num_clients: int = 4
    fraction: float = 1.0
    rounds: int = 2
    local_steps: int = 2
    batch_size: int = 2
    seq_len: int = 128
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    max_examples: int = 240
    test_fraction: float = 0.15
    max_eval: int = 36
    gen_eval_per_task: int = 8
    max_new_tokens: int = 24

    def config(self, strategy: str, output_dir: str):
        """Our `FederatedConfig` of this workload under ``strategy``. ``measure_memory`` is off: the trainer would
        profile a step inside the timed round; both sides are measured by this script instead, outside it."""
        from fedkernels.federated.config import FederatedConfig

        return FederatedConfig(
            model=self.model, dataset="instruct-mix", task="causal-lm", partition="task",
            num_clients=self.num_clients, fraction=self.fraction, rounds=self.rounds, local_steps=self.local_steps,
            batch_size=self.batch_size, seq_len=self.seq_len, optimizer="adamw", lr=self.lr, weight_decay=0.0,
            lora_rank=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, lora_targets=list(self.targets),
            strategy=strategy, test_fraction=self.test_fraction, max_eval=self.max_eval,
            max_examples=self.max_examples, measure_memory=False, seed=self.seed, output_dir=output_dir,
            # Generation is scored once at the end by this script, identically for both sides; the trainer's own
            # per-round generation would only add minutes outside the timed part.
            gen_eval_per_task=0, max_new_tokens=self.max_new_tokens,
        )

    def task(self) -> CausalLMTask:
        return CausalLMTask(max_new_tokens=self.max_new_tokens, gen_eval_per_task=self.gen_eval_per_task)


# --quick: the tiny random Llama (MiniLM WordPiece tokenizer, Alpaca prompt of ~70-90 tokens, so seq_len 128).
QUICK = Workload(model="tiny-llama", num_clients=2, rounds=1, local_steps=2, batch_size=2, seq_len=128, lr=5e-3,
                 max_examples=48, max_eval=12, gen_eval_per_task=2, max_new_tokens=6)
FULL = Workload()


@dataclass
class Split:
    """Tokenised data, held-out rows and each client's rows: what both sides train and score on."""

    data: Any  # InstructionData
    test_idx: np.ndarray
    client_indices: list[np.ndarray]
    source: str  # "trainer" (read from our trainer) or "standalone" (rebuilt here the trainer's way)

    def same_as(self, other: Split) -> bool:
        return (torch.equal(self.data.input_ids, other.data.input_ids)
                and torch.equal(self.data.labels, other.data.labels)
                and np.array_equal(self.test_idx, other.test_idx)
                and len(self.client_indices) == len(other.client_indices)
                and all(np.array_equal(a, b) for a, b in zip(self.client_indices, other.client_indices, strict=True)))


def standalone_split(w: Workload, tokenizer) -> Split:
    """The split `fedkernels.federated.trainer.prepare` makes (seeded hold-out, then the task partition over the
    rest), rebuilt without a trainer: used when ours cannot run, and checked against the trainer's when it can."""
    ds = load_dataset("instruct-mix")
    task = w.task()
    data = task.tokenize(ds, tokenizer, w.seq_len, w.max_examples, seed=w.seed)
    keys = task.partition_labels(data)
    perm = rng_for(w.seed, 0x7E57).permutation(len(data))
    n_test = max(1, int(round(w.test_fraction * len(data))))
    test_idx = task.held_out(perm[:n_test], keys, w.max_eval)
    train_idx = np.sort(perm[n_test:])
    parts = partition(keys[train_idx], w.num_clients, ("task", None), w.seed)
    return Split(data, test_idx, [train_idx[p] for p in parts], "standalone")


def sample_clients(w: Workload, round_idx: int) -> list[int]:
    """The clients of round ``round_idx``, drawn as `FederatedTrainer.sample_clients` draws them."""
    m = max(1, int(round(w.fraction * w.num_clients)))
    return sorted(rng_for(w.seed, round_idx, 0x5A3).choice(w.num_clients, size=m, replace=False).tolist())


def base_model(w: Workload):
    """(tokenizer, causal LM without adapters): the base `fedkernels.federated.model.build_causal_lm` builds,
    from the same seed (the random ``tiny-llama`` weights are drawn right after ``torch.manual_seed(seed)``)."""
    from fedkernels.federated.model import TINY_LM_PRESETS, _tiny_causal_lm

    torch.manual_seed(w.seed)
    if w.model in TINY_LM_PRESETS:
        tokenizer, model = _tiny_causal_lm(w.model)
    else:
        from fedkernels.assets import load_causal_lm

        tokenizer, model = load_causal_lm(w.model)
    return tokenizer, model.eval()


def initial_factors(w: Workload) -> Factors:
    """Our initial adapter (``build_causal_lm`` with the workload's seed): A kaiming-uniform, B zero."""
    from fedkernels.nn import LoRAConfig

    _, _, layers, _ = w.task().build_model(w.model, LoRAConfig(r=w.rank, alpha=w.alpha, dropout=0.0),
                                           seed=w.seed, targets=list(w.targets))
    return {m: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for m, layer in layers.items()}


# ---------------------------------------------------------------------------------------------- the peft side
class PeftFedAvg:
    """Federated SFT the FlowerTune / OpenFedLLM way on a base model: `get_peft_model` on every client, every
    target module trained, FedAvg of the adapter state dicts weighted by sample counts.

    Args:
        w: the workload; base: the base model every client copies; split: data and partition.
        init: our initial factors to start from (``--init shared``), or None for peft's own initialisation
            (drawn after ``torch.manual_seed(seed + 1)``).
    """

    def __init__(self, w: Workload, base: torch.nn.Module, split: Split, init: Factors | None) -> None:
        import peft

        self.w, self.base, self.split, self.task = w, base, split, w.task()
        self.lora_config = peft.LoraConfig(r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0,
                                           target_modules=list(w.targets), bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(w.seed + 1)
        model = self.client_model(None)
        self.global_state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        if init is not None:
            self.global_state = self._from_factors(init)
        self.initial_state = {k: v.clone() for k, v in self.global_state.items()}
        self.history: list[dict] = []

    def key(self, module: str, factor: str) -> str:
        """The peft state-dict key of our module ``module``'s factor ``A`` or ``B``."""
        return f"base_model.model.{module}.lora_{factor}.weight"

    def _from_factors(self, factors: Factors) -> dict[str, torch.Tensor]:
        out = {}
        for m, (A, B) in factors.items():
            out[self.key(m, "A")], out[self.key(m, "B")] = A.clone(), B.clone()
        if set(out) != set(self.global_state):
            raise KeyError(f"our adapted modules do not map onto peft's adapter keys: ours-only "
                           f"{sorted(set(out) - set(self.global_state))[:4]}, peft-only "
                           f"{sorted(set(self.global_state) - set(out))[:4]}")
        for k, v in out.items():
            if v.shape != self.global_state[k].shape:
                raise ValueError(f"adapter key {k!r}: ours has shape {tuple(v.shape)}, peft "
                                 f"{tuple(self.global_state[k].shape)}")
        return out

    def factors(self, state: dict[str, torch.Tensor] | None = None) -> Factors:
        """``state`` (default: the global adapter) as our module -> (A, B)."""
        state = self.global_state if state is None else state
        pre, suf = "base_model.model.", ".lora_A.weight"
        mods = [k[len(pre): -len(suf)] for k in state if k.endswith(suf)]
        return {m: (state[self.key(m, "A")], state[self.key(m, "B")]) for m in mods}

    def client_model(self, state: dict[str, torch.Tensor] | None):
        """A client's own model: a copy of the base wrapped by ``get_peft_model``, holding ``state``."""
        import peft

        model = peft.get_peft_model(copy.deepcopy(self.base), self.lora_config)
        if state is not None:
            res = peft.set_peft_model_state_dict(model, state)
            if getattr(res, "unexpected_keys", None):
                raise KeyError(f"peft refused adapter keys {res.unexpected_keys[:4]}")
        return model

    def train_client(self, round_idx: int, cid: int) -> tuple[dict[str, torch.Tensor], int, list[float], dict]:
        """(adapter state dict, sample count, step losses, seconds by phase) of client ``cid`` in a round."""
        import peft

        t0 = time.perf_counter()
        model = self.client_model(self.global_state)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.w.lr, weight_decay=0.0)
        t1 = time.perf_counter()
        idx = self.split.client_indices[cid]
        torch_seed, order = client_order(self.w.seed, round_idx, cid, idx)
        torch.manual_seed(torch_seed)
        model.train()
        losses = []
        for step in range(self.w.local_steps):
            batch = self.split.data.batch(step_indices(order, step, self.w.batch_size))
            loss = self.task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t2 = time.perf_counter()
        state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        t3 = time.perf_counter()
        return state, len(idx), losses, {"setup": t1 - t0, "train": t2 - t1, "upload": t3 - t2}

    def run_round(self, round_idx: int, sampled: list[int]) -> dict:
        """One round: every sampled client trains, the server averages; the round's record."""
        t0, c0 = time.perf_counter(), time.process_time()
        states, counts, clients = [], [], []
        phases = {"setup": 0.0, "train": 0.0, "upload": 0.0}
        for cid in sampled:
            state, n, losses, ph = self.train_client(round_idx, cid)
            states.append(state)
            counts.append(n)
            clients.append({"client": cid, "num_samples": n, "losses": losses})
            for k, v in ph.items():
                phases[k] += v
        t1 = time.perf_counter()
        self.global_state = fedavg(states, counts)
        t2, c2 = time.perf_counter(), time.process_time()
        rec = {"round": round_idx, "sampled": sampled, "clients": clients, "round_s": t2 - t0, "cpu_s": c2 - c0,
               "train_s": phases["train"], "setup_s": phases["setup"], "aggregate_s": t2 - t1}
        self.history.append(rec)
        return rec

    def warm_up(self, batch: dict) -> None:
        """One untimed forward + backward on a throwaway client model (first-call costs off the timed rounds)."""
        model = self.client_model(self.global_state)
        model.train()
        self.task.loss(model, batch).backward()

    def evaluate(self) -> dict[str, float]:
        model = self.client_model(self.global_state)
        return self.task.evaluate(model, self.split.data, self.split.test_idx, generate=True)

    def measure(self, batches: dict[int, dict]) -> dict[int, int]:
        """Allocator peak bytes of one training step of each client on its batch (every module trained)."""
        out = {}
        for cid, batch in batches.items():
            model = self.client_model(self.global_state)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            out[cid] = int(measure_peak(model, batch, params, loss_fn=self.task.loss, optimizer="adamw").peak_bytes)
            del model
        return out


def fedavg(states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor]:
    """Per key, ``sum_k n_k x_k / sum_k n_k`` (accumulated in float64, returned in each key's dtype)."""
    if not states or len(states) != len(counts):
        raise ValueError(f"fedavg needs one sample count per state dict, got {len(states)} states and "
                         f"{len(counts)} counts")
    total = float(sum(counts))
    keys = states[0].keys()
    for i, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            raise KeyError(f"client {i}'s adapter keys differ from client 0's: {sorted(set(s) ^ set(keys))[:4]}")
    return {k: sum(s[k].double() * (n / total) for s, n in zip(states, counts, strict=True)).to(states[0][k].dtype)
            for k in keys}


# ---------------------------------------------------------------------------------------------- our side
@dataclass
class Ours:
    """One of our runs: the trainer of ``strategy`` and what was recorded about its rounds."""

    strategy: str
    trainer: Any
    tmp: tempfile.TemporaryDirectory
    history: list[dict] = field(default_factory=list)
    plans: dict[int, dict[int, dict[str, int]]] = field(default_factory=dict)  # round -> client -> module -> rank

    def run_round(self, round_idx: int) -> dict:
        """`plan_round`, the executor's local training, `finish_round` (aggregation + the trainer's own
        evaluation, which is outside the timed part), `commit_round`; as `FederatedTrainer.run` does."""
        tr = self.trainer
        t0, c0 = time.perf_counter(), time.process_time()
        job = tr.plan_round(round_idx)
        t1 = time.perf_counter()
        outcome = tr.executor.train(job, None)
        t2, c2 = time.perf_counter(), time.process_time()
        record = tr.finish_round(job, outcome, {"plan": t1 - t0, "train": t2 - t1})
        tr.commit_round(record)
        self.plans[round_idx] = {c: dict(job.plans[c].modules) for c in job.sampled}
        if record["failures"]:
            raise RuntimeError(f"ours ({self.strategy}) round {round_idx}: clients failed: {record['failures']}")
        rec = {"round": round_idx, "sampled": list(job.sampled),
               "clients": [{"client": e["client"], "num_samples": int(len(job.indices[e["client"]])),
                            "loss": e.get("loss"), "modules": e.get("modules"), "ranks": e.get("ranks"),
                            "budget": e.get("budget"), "planned_bytes": e.get("planned_bytes")}
                           for e in record["clients"]],
               "round_s": (t2 - t0) + record["timings"]["aggregate"], "train_s": t2 - t1, "setup_s": t1 - t0,
               # CPU seconds of planning + training, plus the aggregation's wall seconds (milliseconds of
               # single-threaded averaging: the finish_round call around it also evaluates, so its CPU time
               # cannot be taken as a whole)
               "cpu_s": (c2 - c0) + record["timings"]["aggregate"],
               "aggregate_s": record["timings"]["aggregate"]}
        self.history.append(rec)
        return rec

    def plan_of(self, cid: int) -> dict[str, int]:
        """Client ``cid``'s plan in the first round it was sampled (planned afresh if it never was)."""
        for r in sorted(self.plans):
            if cid in self.plans[r]:
                return self.plans[r][cid]
        tr = self.trainer
        return dict(tr.planner.plans_for_round(1, [cid], tr.budgets)[cid].modules)

    def factors(self) -> Factors:
        return {m: (A.clone(), B.clone()) for m, (A, B) in self.trainer.global_state.factors.items()}

    def _load_global(self) -> None:
        tr = self.trainer
        load_adapter_state(tr.layers, tr.global_state.factors)
        for layer in tr.layers.values():
            layer.trainable = False

    def warm_up(self, task: CausalLMTask, batch: dict) -> None:
        """One untimed forward + backward with every adapter trainable, no optimizer step; gradients, flags and
        the torch RNG state are put back, so the run is the one it would have been without it."""
        tr = self.trainer
        rng = torch.get_rng_state()
        flags = [(p, p.requires_grad) for p in tr.model.parameters()]
        for layer in tr.layers.values():
            layer.trainable = True
        tr.model.train()
        task.loss(tr.model, batch).backward()
        tr.model.eval()
        for p, f in flags:
            p.grad = None
            p.requires_grad_(f)
        torch.set_rng_state(rng)

    def evaluate(self, task: CausalLMTask, split: Split) -> dict[str, float]:
        self._load_global()
        return task.evaluate(self.trainer.model, split.data, split.test_idx, generate=True)

    def measure(self, task: CausalLMTask, batches: dict[int, dict], plans: dict[int, dict[str, int]]) -> dict[int, int]:
        """Allocator peak of one step of each client on its batch, under its plan, set up as `train_client`
        sets up a client (planned modules trainable at their rank, the others frozen)."""
        tr = self.trainer
        out = {}
        for cid, batch in batches.items():
            self._load_global()
            plan = plans[cid]
            for m, r in plan.items():
                tr.layers[m].set_active_rank(min(r, tr.layers[m].r))
                tr.layers[m].trainable = True
            params = [p for m in plan for p in (tr.layers[m].lora_A, tr.layers[m].lora_B)]
            tr.model.train()
            out[cid] = int(measure_peak(tr.model, batch, params, loss_fn=task.loss, optimizer="adamw").peak_bytes)
            tr.model.eval()
        self._load_global()
        return out


def build_ours(w: Workload, strategy: str) -> Ours:
    from fedkernels.federated.trainer import FederatedTrainer

    tmp = tempfile.TemporaryDirectory(prefix=f"anchor-{strategy}-")
    trainer = FederatedTrainer(w.config(strategy, tmp.name))
    trainer.begin_run()
    return Ours(strategy, trainer, tmp)


def trainer_split(trainer) -> Split:
    return Split(trainer.data, np.asarray(trainer.test_idx), [np.asarray(c) for c in trainer.client_indices],
                 "trainer")


# ---------------------------------------------------------------------------------------------- the harness
def _max_abs_diff(a: Factors, b: Factors) -> float:
    return max(max(float((a[m][0] - b[m][0]).abs().max()), float((a[m][1] - b[m][1]).abs().max())) for m in a)


def _delta_norm(a: Factors, b: Factors) -> float:
    return float(sum(float((a[m][0] - b[m][0]).double().pow(2).sum() + (a[m][1] - b[m][1]).double().pow(2).sum())
                     for m in a) ** 0.5)


def _side_row(name: str, strategy: str, history: list[dict], peaks: dict[int, int], metrics: dict[str, float],
              delta: float, plans: dict[int, dict[str, int]] | None = None) -> dict:
    round_s = [h["round_s"] for h in history]
    row = {
        "side": name, "strategy": strategy,
        "s_per_round": statistics.mean(round_s), "round_s": round_s,
        "cpu_s_per_round": statistics.mean(h["cpu_s"] for h in history),
        "train_s_per_round": statistics.mean(h["train_s"] for h in history),
        "setup_s_per_round": statistics.mean(h["setup_s"] for h in history),
        "aggregate_s_per_round": statistics.mean(h["aggregate_s"] for h in history),
        "peak_bytes": {str(c): b for c, b in sorted(peaks.items())},
        "peak_mib_max": max(peaks.values()) / MiB, "peak_mib_mean": statistics.mean(peaks.values()) / MiB,
        "rougeL": metrics.get("rougeL"), "exact_match": metrics.get("exact_match"),
        "eval_loss": metrics["loss"], "metrics": metrics, "adapter_delta_norm": delta,
        "client_losses": {f"{h['round']}:{c['client']}": c.get("losses", c.get("loss")) for h in history
                          for c in h["clients"]},
        "rounds": history,
    }
    if plans is not None:
        row["plan_modules"] = {str(c): len(p) for c, p in sorted(plans.items())}
        # the memory model's predicted peak and the budget of each client's plan, next to the measured peak
        for key in ("planned_bytes", "budget"):
            seen: dict[str, Any] = {}
            for h in history:
                for c in h["clients"]:
                    seen.setdefault(str(c["client"]), c.get(key))
            row[key] = dict(sorted(seen.items()))
    return row


def _log(msg: str) -> None:
    print(msg, flush=True)


def run(w: Workload, strategies: list[str], *, init: str = "shared", log: Callable[[str], None] = _log) -> dict:
    """Run the comparison; the results record (see the module docstring). ``strategies``: ours, the first one
    being the like-for-like ``fedit-full`` normally; a strategy whose trainer cannot be built is reported under
    ``ours_errors`` and the peft side still runs."""
    torch.set_num_threads(cpu_threads())
    warnings.filterwarnings("ignore")
    task = w.task()
    t_start = time.perf_counter()

    ours: dict[str, Ours] = {}
    errors: dict[str, str] = {}
    build_s: dict[str, float] = {}  # one-off set-up before round 1, outside s/round
    for s in strategies:
        try:
            t0 = time.perf_counter()
            ours[s] = build_ours(w, s)
            build_s[s] = time.perf_counter() - t0
            log(f"ours ({s}): trainer built in {build_s[s]:.1f} s (model, data, planner calibration)")
        except Exception as exc:  # noqa: BLE001 - reported in the results; the peft side is still measured
            errors[s] = f"{type(exc).__name__}: {exc}"
            log(f"ours ({s}) cannot run: {errors[s]}")
    t0 = time.perf_counter()
    tokenizer, base = base_model(w)
    build_s["peft"] = time.perf_counter() - t0
    standalone = standalone_split(w, tokenizer)
    split = trainer_split(next(iter(ours.values())).trainer) if ours else standalone
    same_split = {s: trainer_split(o.trainer).same_as(standalone) for s, o in ours.items()}
    if ours and not all(same_split.values()):
        log(f"note: the trainers' splits differ from the standalone rebuild ({same_split}); every side uses "
            f"{strategies[0]}'s")
    init_factors = None
    if init == "shared":
        init_factors = ours[strategies[0]].factors() if ours else initial_factors(w)
    peft_side = PeftFedAvg(w, base, split, init_factors)
    start_ours = {s: o.factors() for s, o in ours.items()}
    start_peft = peft_side.factors(peft_side.initial_state)
    log(f"data: {len(split.data)} rows ({split.data.dropped} dropped at seq_len {w.seq_len}), "
        f"{len(split.test_idx)} held out, client rows {[len(c) for c in split.client_indices]}")

    # First calls (allocator growth, kernel selection) cost ~3 s on SmolLM2 here: whichever side went first in
    # round 1 was that much slower than in round 2. Warm every side up once, untimed.
    probe = split.data.batch(step_indices(split.client_indices[0], 0, w.batch_size))
    for o in ours.values():
        o.warm_up(task, probe)
    peft_side.warm_up(probe)

    # Rounds interleaved (ours..., peft; then the next round in the reverse order) so that a slow phase of the
    # shared 2-core machine (+-30 % minute to minute) falls on both sides.
    sides: list[str] = [*ours, "peft"]
    for r in range(1, w.rounds + 1):
        sampled = sample_clients(w, r)
        for name in sides if r % 2 else sides[::-1]:
            if name == "peft":
                rec = peft_side.run_round(r, sampled)
            else:
                rec = ours[name].run_round(r)
                if rec["sampled"] != sampled:
                    raise RuntimeError(f"round {r}: ours ({name}) sampled {rec['sampled']}, this script {sampled}")
            log(f"round {r} {name}: {rec['round_s']:.2f} s (train {rec['train_s']:.2f} s, CPU {rec['cpu_s']:.2f} s)")

    # Memory: every client's first batch of round 1, measured on both sides in this process.
    batches = {}
    for cid, idx in enumerate(split.client_indices):
        _, order = client_order(w.seed, 1, cid, idx)
        batches[cid] = split.data.batch(step_indices(order, 0, w.batch_size))
    rows = []
    peft_peaks = peft_side.measure(batches)
    for s, o in ours.items():
        plans = {c: o.plan_of(c) for c in batches}
        peaks = o.measure(task, batches, plans)
        metrics = o.evaluate(task, split)
        rows.append(_side_row("ours", s, o.history, peaks, metrics, _delta_norm(o.factors(), start_ours[s]), plans))
        log(f"ours ({s}) scored: rougeL {metrics.get('rougeL')}")
    peft_metrics = peft_side.evaluate()
    rows.append(_side_row("peft/FedAvg", "fedavg (every module)", peft_side.history, peft_peaks, peft_metrics,
                          _delta_norm(peft_side.factors(), start_peft)))
    peft_row = rows[-1]
    ratios = {}
    for row in rows[:-1]:
        ratios[row["strategy"]] = {
            "time": row["s_per_round"] / peft_row["s_per_round"],
            "train_time": row["train_s_per_round"] / peft_row["train_s_per_round"],
            "cpu_time": row["cpu_s_per_round"] / peft_row["cpu_s_per_round"],
            "memory_max": row["peak_mib_max"] / peft_row["peak_mib_max"],
            "memory_mean": row["peak_mib_mean"] / peft_row["peak_mib_mean"],
            "rougeL_diff": (row["rougeL"] - peft_row["rougeL"]) if row["rougeL"] is not None else None,
        }
    like = "fedit-full" in ours
    return {
        "workload": {**asdict(w), "targets": list(w.targets)}, "strategies": strategies, "init": init,
        "device": device_name("cpu"), "machine": platform.platform(), "threads": torch.get_num_threads(),
        "versions": _versions(), "rows": rows, "ratios": ratios, "ours_errors": errors,
        "split_source": split.source, "split_matches_standalone": same_split,
        "data": {"rows": len(split.data), "dropped": split.data.dropped, "held_out": len(split.test_idx),
                 "client_rows": [len(c) for c in split.client_indices]},
        # fedit-full and peft FedAvg compute the same algorithm from the same start on the same batches: their
        # global adapters should agree to float rounding (a bug on either side shows up here first).
        "fedit_full_vs_peft_max_abs_diff": (_max_abs_diff(ours["fedit-full"].factors(), peft_side.factors())
                                            if like and init == "shared" else None),
        # the scale to read it against: the largest change of any adapter entry over the run (peft side)
        "peft_max_abs_update": _max_abs_diff(peft_side.factors(), start_peft),
        "build_s": build_s, "total_s": time.perf_counter() - t_start,
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def table(result: dict) -> str:
    """The Markdown table: one row per side, ratios ours / peft (wall and CPU seconds per round, max peak)."""
    lines = ["| run | s/round | CPU s/round | per-client peak MiB (max / mean) | ROUGE-L | EM | held-out loss | "
             "time ratio (wall / CPU) | memory ratio (max) | ROUGE-L diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        rat = result["ratios"].get(row["strategy"]) if row["side"] == "ours" else None
        name = f"ours {row['strategy']}" if row["side"] == "ours" else "peft `get_peft_model` + FedAvg"
        ratios = (f"{rat['time']:.3f} / {rat['cpu_time']:.3f} | {rat['memory_max']:.3f} | "
                  f"{_fmt(rat['rougeL_diff'])} |") if rat else "1 / 1 | 1 | 0 |"
        lines.append(
            f"| {name} | {row['s_per_round']:.2f} | {row['cpu_s_per_round']:.2f} | "
            f"{row['peak_mib_max']:.1f} / {row['peak_mib_mean']:.1f} | {_fmt(row['rougeL'])} | "
            f"{_fmt(row['exact_match'])} | {row['eval_loss']:.4f} | " + ratios)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 2 clients, 1 round (seconds)")
    ap.add_argument("--strategies", default="fedit-full", help="ours, comma-separated (e.g. fedit-full,fedpilot)")
    ap.add_argument("--init", choices=("shared", "peft"), default="shared",
                    help="shared: peft starts from our initial adapter; peft: peft's own initialisation")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<device>-anchor.json)")
    for f in ("model", "num_clients", "fraction", "rounds", "local_steps", "batch_size", "seq_len", "lr", "rank",
              "alpha", "seed", "max_examples", "max_eval", "gen_eval_per_task", "max_new_tokens"):
        kind = type(getattr(FULL, f))
        ap.add_argument("--" + f.replace("_", "-"), type=kind, default=None)
    ap.add_argument("--targets", default=None, help="comma-separated LoRA targets")
    args = ap.parse_args(argv)
    w = QUICK if args.quick else FULL
    over = {f: v for f, v in vars(args).items() if f in Workload.__dataclass_fields__ and v is not None}
    if args.targets:
        over["targets"] = tuple(t for t in args.targets.split(",") if t)
    w = replace(w, **over)
    strategies = [s for s in args.strategies.split(",") if s]
    result = run(w, strategies, init=args.init)
    result["command"] = "python bench/anchor_sft.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or RESULTS_DIR / f"{result['device']}-anchor{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(table(result))
    if result["fedit_full_vs_peft_max_abs_diff"] is not None:
        print(f"fedit-full vs peft FedAvg: global adapters differ by at most "
              f"{result['fedit_full_vs_peft_max_abs_diff']:.3g} (largest update of an entry over the run: "
              f"{result['peft_max_abs_update']:.3g})")
    for s, e in result["ours_errors"].items():
        print(f"ours ({s}) did not run: {e}")
    print(f"results: {out} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
