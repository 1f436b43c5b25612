"""Task kinds: what a federated run trains and how it is scored.

One object per kind owns everything task-specific: tokenisation and batching, the model builder, the training
loss, the probe batch used for memory calibration and importance, the labels the partitioners split on, and
evaluation. The rest of the federation (planner, client training, aggregation, Flower) only calls these.

- ``classification``: a sequence classifier on ``text`` / ``label`` columns; cross-entropy, accuracy.
- ``causal-lm``: instruction tuning of a decoder on ``instruction`` / ``input`` / ``output`` columns;
  next-token cross-entropy on response tokens, held-out loss and perplexity, and greedy generation scored
  with ROUGE-L (Lin 2004, the ``rouge-score`` package) and exact match, per task and macro-averaged.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedkernels.errors import ConfigError
from fedkernels.federated.config import TASK_KINDS
from fedkernels.federated.instruct import IGNORE, InstructionData, normalise_answer

__all__ = ["Task", "ClassificationTask", "CausalLMTask", "TASKS", "get_task", "infer_task", "task_from_config",
           "rouge_l"]


class Task(abc.ABC):
    """Base of the task kinds. Subclasses declare ``name``, ``columns`` (the columns a dataset needs),
    ``trains_head`` (whether a head is trained by every client and averaged, beside the adapters) and
    ``headline_metric`` (the `evaluate` key the round table, progress bar and compare report; higher is better)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    trains_head: ClassVar[bool]
    headline_metric: ClassVar[str]
    peft_task_type: ClassVar[str | None]  # the export's peft task type (None: a plain `PeftModel`)
    # Whether the held-out pass runs every round (causal LM: loss and perplexity are one cheap forward) or only on
    # the rounds of `FederatedConfig.evaluates_at` (classification: on MiniLM-L6 the 300-article pass was 31 % of a
    # suite round's time, docs/suite-paper.md before eval_every). The trainer owns the schedule; a task only says
    # what it evaluates (`generates`: whether the scheduled rounds also run the generation metrics).
    evaluates_every_round: ClassVar[bool] = False

    def num_labels(self, dataset) -> int | None:
        """The size of the head `build_model` needs for ``dataset`` (None: the task trains no head)."""
        return None

    @abc.abstractmethod
    def tokenize(self, dataset, tokenizer, seq_len: int, max_examples: int | None = None, seed: int = 0):
        """The dataset as tokenised batches of this task (an object with ``len`` and ``batch(idx)``)."""

    @abc.abstractmethod
    def build_model(self, name: str, lora, *, seed: int, num_labels: int | None = None, targets=None):
        """(tokenizer, model with LoRA layers, layers by name, trained head name or None). ``targets``: the
        adapted modules; None: the architecture's default (`fedkernels.federated.model.default_lora_targets`).
        """

    @abc.abstractmethod
    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss from the model's logits (parallel clients slice the logits per client)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, data, idx: Sequence[int], *, generate: bool = False,
                 batch_size: int = 32) -> dict[str, float]:
        """Held-out metrics of ``model`` on rows ``idx`` of ``data`` (``generate``: the generation metrics too)."""

    @abc.abstractmethod
    def partition_labels(self, data) -> np.ndarray:
        """One key per example that the partitioners split on (class id, or task id)."""

    # ------------------------------------------------------------------ shared
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (a scalar; its gradient is what clients step on)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.loss_from_logits(out.logits, batch)

    def probe_batch(self, data, indices: Sequence[int], batch_size: int) -> dict[str, torch.Tensor]:
        """The batch the memory model is calibrated on and importance is scored with: ``batch_size`` rows of
        ``indices`` (wrapping), at the training shape, so its activations are exactly a training step's."""
        return data.batch(np.take(np.asarray(indices), range(batch_size), mode="wrap"))

    @property
    def generates(self) -> bool:
        """Whether the scheduled evaluations (`FederatedConfig.evaluates_at`) run generation metrics too."""
        return False

    def held_out(self, pool: np.ndarray, keys: np.ndarray, max_eval: int) -> np.ndarray:
        """The evaluated rows (sorted) of the held-out ``pool`` (a seeded permutation's head), at most ``max_eval``:
        the ``max_eval`` lowest indices (the classification runs' split since the first release)."""
        return np.sort(pool)[:max_eval]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ClassificationTask(Task):
    name = "classification"
    columns = ("text", "label")
    trains_head = True
    headline_metric = "accuracy"
    peft_task_type = None  # the head travels as modules_to_save; peft's SEQ_CLS would add its own classifier

    def num_labels(self, dataset) -> int:
        feature = dataset.features.get("label")
        if feature is None or not hasattr(feature, "num_classes"):
            raise ConfigError(f"classification needs a ClassLabel 'label' column to size its head; columns found: "
                              f"{list(dataset.column_names)}")
        return int(feature.num_classes)

    def tokenize(self, dataset, tokenizer, seq_len: int, max_examples: int | None = None, seed: int = 0):
        from fedkernels.federated.data import tokenize

        return tokenize(dataset, tokenizer, seq_len, max_examples, seed=seed)

    def build_model(self, name: str, lora, *, seed: int, num_labels: int | None = None, targets=None):
        from fedkernels.federated.model import build_model

        if num_labels is None:
            raise ConfigError("classification needs num_labels to build its head, got None")
        return build_model(name, num_labels, lora, seed=seed, targets=targets)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def partition_labels(self, data) -> np.ndarray:
        return data.labels.numpy()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data, idx: Sequence[int], *, generate: bool = False,
                 batch_size: int = 64) -> dict[str, float]:
        """``accuracy`` and mean cross-entropy ``loss`` over ``idx``."""
        idx = np.asarray(idx)
        if len(idx) == 0:
            raise ConfigError("evaluate: the held-out index set is empty")
        model.eval()
        correct, total = 0, 0.0
        for lo in range(0, len(idx), batch_size):
            batch = data.batch(idx[lo: lo + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"accuracy": correct / len(idx), "loss": total / len(idx)}


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words, `rouge_score`'s tokenizer: lowercase,
    alphanumeric tokens, no stemming)."""
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ConfigError("causal-lm generation metrics need the 'rouge-score' package "
                              "(pip install rouge-score)") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


class CausalLMTask(Task):
    """Instruction tuning of a causal LM.

    Args:
        max_new_tokens: generation length cap.
        gen_eval_per_task: held-out rows per task that are generated and scored (0: none).
    """

    name = "causal-lm"
    columns = ("instruction", "output")
    trains_head = False
    headline_metric = "rougeL"
    peft_task_type = "CAUSAL_LM"  # PeftModel.from_pretrained returns PeftModelForCausalLM, which generates
    evaluates_every_round = True

    def __init__(self, *, max_new_tokens: int = 32, gen_eval_per_task: int = 16) -> None:
        for key, v, lo in (("max_new_tokens", max_new_tokens, 1), ("gen_eval_per_task", gen_eval_per_task, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"CausalLMTask.{key} must be an integer >= {lo}, got {v!r}")
        self.max_new_tokens = max_new_tokens
        self.gen_eval_per_task = gen_eval_per_task

    def __repr__(self) -> str:
        return f"CausalLMTask(max_new_tokens={self.max_new_tokens}, gen_eval_per_task={self.gen_eval_per_task})"

    def tokenize(self, dataset, tokenizer, seq_len: int, max_examples: int | None = None,
                 seed: int = 0) -> InstructionData:
        from fedkernels.federated.instruct import normalise_instructions, tokenize_instructions

        if not {"instruction", "input", "output", "task"} <= set(dataset.column_names):
            dataset = normalise_instructions(dataset)
        return tokenize_instructions(dataset, tokenizer, seq_len, max_examples, seed=seed)

    def build_model(self, name: str, lora, *, seed: int, num_labels: int | None = None, targets=None):
        from fedkernels.federated.model import build_causal_lm

        return build_causal_lm(name, lora, seed=seed, targets=targets)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the response tokens (labels != -100).

        Position t predicts token t+1. Only the selected positions are cast to fp32: with a 49k vocabulary
        the fp32 copy of all logits would be a rank-independent 4 x 128 x 49152 x 4 B = 96 MiB per step.
        Dividing by max(count, 1) keeps a batch without any response token at loss 0 with a zero gradient
        instead of 0/0 = NaN.
        """
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE
        picked = logits[:, :-1][valid].float()
        total = F.cross_entropy(picked, targets[valid], reduction="sum")
        return total / valid.sum().clamp(min=1)

    def partition_labels(self, data) -> np.ndarray:
        return data.task_ids.numpy()

    @property
    def generates(self) -> bool:
        return self.gen_eval_per_task > 0

    def held_out(self, pool: np.ndarray, keys: np.ndarray, max_eval: int) -> np.ndarray:
        """Round-robin over the tasks in ``pool``'s (random) order, so every task is evaluated: instruction sets
        are stored task by task, and the lowest ``max_eval`` indices of instruct-mix's 300-row demo split held
        only 2 of its 3 tasks."""
        pool = np.asarray(pool)
        by_task = [pool[keys[pool] == t] for t in np.unique(keys[pool])]
        picked = [rows[i] for i in range(max(len(r) for r in by_task)) for rows in by_task if i < len(rows)]
        return np.sort(np.asarray(picked[:max_eval], dtype=pool.dtype))

    @torch.no_grad()
    def generate(self, model: nn.Module, data: InstructionData, rows: Sequence[int], *,
                 batch_size: int = 8) -> list[str]:
        """Greedy continuations of the prompts of ``rows`` (left-padded batches), decoded without special
        tokens."""
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=data.eos_token_id, pad_token_id=data.pad_token_id)
        model.eval()
        out: list[str] = []
        rows = list(rows)
        for lo in range(0, len(rows), batch_size):
            prompts = [data.prompt_ids[int(r)] for r in rows[lo: lo + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), data.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for k, p in enumerate(prompts):
                ids[k, width - len(p):] = torch.tensor(p)
                mask[k, width - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            for k in range(len(prompts)):
                out.append(data.tokenizer.decode(gen[k, width:], skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: InstructionData, idx: Sequence[int], *, generate: bool = False,
                 batch_size: int = 32) -> dict[str, float]:
        """Held-out ``loss`` (mean over response tokens) and ``perplexity`` = exp(loss), per task as
        ``loss/<task>``; with ``generate``, greedy generation on the first ``gen_eval_per_task`` rows of each
        task in ``idx``, scored as ``rougeL/<task>`` and ``exact_match/<task>``, and macro-averaged over the
        tasks as ``rougeL`` and ``exact_match``."""
        idx = np.asarray(idx)
        if len(idx) == 0:
            raise ConfigError("evaluate: the held-out index set is empty")
        model.eval()
        tok_loss = torch.zeros(data.num_tasks, dtype=torch.float64)
        tok_count = torch.zeros(data.num_tasks, dtype=torch.float64)
        for lo in range(0, len(idx), batch_size):
            rows = idx[lo: lo + batch_size]
            batch = data.batch(rows)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            valid = targets != IGNORE
            # Response positions only, as in the training loss: no fp32 copy of every position's logits.
            per_tok = F.cross_entropy(logits[:, :-1][valid].float(), targets[valid], reduction="none")
            task = data.task_ids[torch.as_tensor(rows)].unsqueeze(1).expand_as(valid)[valid]
            tok_loss.index_add_(0, task, per_tok.double())
            tok_count.index_add_(0, task, torch.ones_like(per_tok, dtype=torch.float64))
        loss = float(tok_loss.sum() / tok_count.sum().clamp(min=1))
        metrics: dict[str, float] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        for t, name in enumerate(data.task_names):
            if tok_count[t] > 0:
                metrics[f"loss/{name}"] = float(tok_loss[t] / tok_count[t])
        if generate and self.gen_eval_per_task > 0:
            metrics.update(self.generation_metrics(model, data, idx))
        return metrics

    def generation_metrics(self, model: nn.Module, data: InstructionData, idx: Sequence[int]) -> dict[str, float]:
        """ROUGE-L and exact match per task over a capped sample of ``idx``, and their macro averages."""
        idx = np.asarray(idx)
        task_of = data.task_ids.numpy()[idx]
        out: dict[str, float] = {}
        rouge, em = [], []
        for t, name in enumerate(data.task_names):
            rows = idx[task_of == t][: self.gen_eval_per_task]
            if len(rows) == 0:
                continue
            preds = self.generate(model, data, rows)
            refs = [data.references[int(r)] for r in rows]
            r = float(np.mean([rouge_l(p, y) for p, y in zip(preds, refs, strict=True)]))
            e = float(np.mean([normalise_answer(p) == normalise_answer(y) for p, y in zip(preds, refs, strict=True)]))
            out[f"rougeL/{name}"], out[f"exact_match/{name}"] = r, e
            rouge.append(r)
            em.append(e)
        out["rougeL"] = float(np.mean(rouge))
        out["exact_match"] = float(np.mean(em))
        return out


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ClassificationTask, CausalLMTask)}
if tuple(TASKS) != TASK_KINDS:  # the config validates task names from its torch-free copy of this list
    raise ImportError(f"fedkernels.federated.config.TASK_KINDS {TASK_KINDS} != tasks {tuple(TASKS)}")


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` (``classification`` or ``causal-lm``); ``options`` go to its constructor."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](**options)


def infer_task(column_names: Sequence[str], columns: dict[str, str] | None = None, *, source: str = "dataset") -> str:
    """``classification`` for ``text``/``label`` columns, ``causal-lm`` for instruction/output ones (aliases
    and an explicit ``columns`` mapping count).

    Raises:
        ConfigError: neither fits; the message lists the columns found.
    """
    from fedkernels.federated.instruct import resolve_columns

    found = list(column_names)
    columns = dict(columns or {})
    text, label = columns.get("text", "text"), columns.get("label", "label")
    if text in found and label in found:
        return "classification"
    try:
        resolve_columns(found, {k: v for k, v in columns.items() if k in ("instruction", "input", "output", "task")},
                        source=source)
    except ConfigError:
        raise ConfigError(f"{source}: cannot tell the task from its columns: classification needs "
                          f"{[text, label]}, causal-lm needs instruction and output (or input/response/...); "
                          f"columns found: {found}") from None
    return "causal-lm"


def task_from_config(cfg, column_names: Sequence[str] | None = None) -> Task:
    """The `Task` of a `FederatedConfig`: ``cfg.task``, or inferred from ``column_names`` when it is None."""
    name = cfg.task
    if name is None:
        if column_names is None:
            raise ConfigError("FederatedConfig.task is None and no dataset columns were given to infer it from")
        name = infer_task(column_names, cfg.columns, source=f"dataset {cfg.dataset!r}")
    if name == CausalLMTask.name:
        return get_task(name, max_new_tokens=cfg.max_new_tokens, gen_eval_per_task=cfg.gen_eval_per_task)
    return get_task(name)
