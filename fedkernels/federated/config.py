"""`FederatedConfig`: every knob of a federated run, loadable from YAML/TOML and overridable by key=value."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fedkernels.errors import ConfigError

__all__ = ["FederatedConfig", "PRESETS", "Preset", "STRATEGIES"]


class Preset(NamedTuple):
    """A ``FederatedConfig.strategy``: an allocation of `solvers.strategies` and a `fedkernels.aggregation` rule."""

    allocation: str
    rule: str


# The one table of strategy presets; the trainer, the Flower client and the CLI all read it.
PRESETS: dict[str, Preset] = {
    "fedpilot": Preset("fedpilot", "fedpilot"),
    "fedhello": Preset("fedhello-rgd:bottleneck", "fedhello"),
    "fedra": Preset("fedra", "fedra"),
    "hetlora": Preset("hetlora", "hetlora"),
    "flexlora": Preset("flexlora", "flexlora"),
    "flora": Preset("hetlora", "flora"),  # heterogeneous ranks (the HetLoRA allocation), stacked by FLoRA
    "fedit-min": Preset("uniform-min", "fedit"),
    "fedit-full": Preset("full", "fedit"),
    # ours (issue 15, item 5): knapsack over modules x ranks re-solved as IG-score importance follows training,
    # exact product-update aggregation across ranks with a bounded coverage compensation
    "fk-adaptive": Preset("fk-adaptive", "fk-adaptive"),
}
STRATEGIES = tuple(PRESETS)
PARTITIONS = ("iid", "dirichlet", "pathological", "task")
# The task kinds of `fedkernels.federated.tasks.TASKS`, named here so a config validates without importing torch.
TASK_KINDS = ("classification", "causal-lm")


@dataclass
class FederatedConfig:
    """A federated LoRA fine-tuning run.

    Args:
        model: bundled model name (``minilm-l6``, ``tiny-bert`` for tests) or a local HF model folder.
        dataset: ``bbc-news`` (bundled) or a local CSV/JSON/JSONL file with ``text`` and ``label`` columns.
        partition: ``iid``, ``dirichlet:<alpha>``, ``pathological:<classes per client>`` or ``task`` (each
            client holds one task of a multi-task instruction set; iid/dirichlet split over tasks there).
        num_clients: number of clients the data is split over.
        fraction: share of clients sampled each round (at least one).
        rounds: federated rounds.
        local_steps: optimizer steps per client per round.
        batch_size, seq_len: local batch shape (texts are padded/truncated to seq_len tokens).
        optimizer: ``adamw`` or ``sgd``; lr, weight_decay: its settings.
        lora_rank, lora_alpha, lora_dropout, lora_targets: the adapter every client may train a subset of;
            lora_targets None: the architecture's attention projections (`federated.model.default_lora_targets`:
            BERT query/value, Llama/Qwen2/Mistral q_proj/v_proj, GPT-2 c_attn).
        strategy: one of STRATEGIES.
        allocation: override the preset's allocation (``fedhello-fim``, ``fedhello-gd:triangle``, ...).
        budgets: per-client memory budgets in human units (``["300MiB", ...]``), one per client; or
        budgets_file: a CSV of ``client,budget`` rows; or, when neither is given,
        budget_tiers: tiers as fractions of the way from the cheapest trainable plan (0) to training
            everything (1), e.g. ``[0.15, 0.5, 1.0]``; clients are spread over the tiers round-robin.
        test_fraction: share of the data held out for global evaluation; max_eval caps its size.
        min_fit_fraction: a round aggregates only if at least this share of sampled clients succeeded.
        planner_backend: solver backend for allocation plans (``dp``, ``greedy``, ``pulp``, ``cvxpy``).
        aggregation_options: extra keyword options of the aggregation rule.
        allocation_options: options of an adaptive allocation (``fk-adaptive``), see
            `fedkernels.federated.planning.AdaptiveOptions`: ``ig_lambda``, ``replan_tol``, ``decay``.
        parallel_clients: simulate this many clients per forward/backward with MultiLoRALinear (1 = off;
            see `fedkernels.federated.parallel`: clients needing a memory measurement, LoRA dropout > 0 and
            groups that raise are trained one at a time).
        measure_memory: measure each client's training memory (saved tensors + params/grads/states).
        memory_margin: relative safety margin on predicted peaks (0.05 = 5 %), for allocator fragmentation.
        faults: fault injection for tests and demos: client id -> ``raise`` | ``nan`` | ``shape``.
        seed: drives partitioning, sampling, allocation, initialisation and local training.
        output_dir: where metrics, checkpoints and the exported adapter go.
        task: ``classification`` or ``causal-lm``; None infers it from the dataset's columns (text/label or
            instruction/output).
        eval_every: the expensive evaluation every this many rounds: classification's held-out pass, causal-lm's
            greedy generation (ROUGE-L, exact match; its loss/perplexity run every round).
        eval_last: that evaluation also runs on each of the last this many rounds (a score averaged over the
            last rounds needs every one of them).
        max_new_tokens: causal-lm: generation length cap.
        gen_eval_per_task: causal-lm: held-out rows per task that are generated and scored (0: none).
        columns: role -> column name of the dataset (roles text, label, instruction, input, output, task);
            unset roles use the usual names (Alpaca's and Dolly's are recognised).
    """

    model: str = "minilm-l6"
    dataset: str = "bbc-news"
    partition: str = "dirichlet:0.5"
    num_clients: int = 20
    fraction: float = 0.25
    rounds: int = 4
    local_steps: int = 8
    batch_size: int = 8
    seq_len: int = 64
    optimizer: str = "adamw"
    lr: float = 5e-3
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    strategy: str = "fedpilot"
    allocation: str | None = None
    budgets: list[str] | None = None
    budgets_file: str | None = None
    budget_tiers: list[float] = field(default_factory=lambda: [0.15, 0.5, 1.0])
    test_fraction: float = 0.15
    max_eval: int = 300
    max_examples: int | None = None
    min_fit_fraction: float = 0.5
    planner_backend: str = "dp"
    aggregation_options: dict[str, Any] = field(default_factory=dict)
    allocation_options: dict[str, Any] = field(default_factory=dict)
    parallel_clients: int = 1
    measure_memory: bool = True
    # Relative safety margin on every predicted peak (allocator fragmentation): plans, the minimum and the budget
    # check use peak x (1 + margin). 0: on CPU the calibrated model bounds the profiler-measured peak of all
    # 16 acceptance plans (tests/solvers/test_memory_peak.py; bench/memory_peak.py: 0-3.8 % to spare); on CUDA use what
    # (memory_reserved - max_allocated) / max_allocated measures there (solvers.measure reports both).
    memory_margin: float = 0.0
    faults: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"
    seed: int = 0
    output_dir: str = "runs/fedkernels"
    # Task kind and causal-LM evaluation (fedkernels.federated.tasks): task None = inferred from the columns.
    task: str | None = None
    eval_every: int = 1
    eval_last: int = 1
    max_new_tokens: int = 32
    gen_eval_per_task: int = 16
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"FederatedConfig.{name} {why}, got {getattr(self, name)!r}")

        # Types first: a YAML `fraction: "0.5"` would otherwise surface as a TypeError deep in a comparison.
        for name, hint in _field_hints(type(self)).items():
            setattr(self, name, _check_type(name, getattr(self, name), hint))
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"FederatedConfig.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self.partition_spec()  # validates
        for name in ("num_clients", "rounds", "local_steps", "batch_size", "seq_len", "lora_rank", "parallel_clients"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if not 0.0 < self.fraction <= 1.0:
            raise bad("fraction", "must be in (0, 1]")
        if not 0.0 <= self.min_fit_fraction <= 1.0:
            raise bad("min_fit_fraction", "must be in [0, 1]")
        if not 0.0 < self.test_fraction < 1.0:
            raise bad("test_fraction", "must be in (0, 1)")
        # max_eval / max_examples of 0 leave an empty split, whose mean accuracy divides by zero in round 1.
        if self.max_eval < 1:
            raise bad("max_eval", "must be a positive integer")
        if self.max_examples is not None and self.max_examples < 1:
            raise bad("max_examples", "must be a positive integer or None")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite positive number")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", "must be a finite positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "must be a finite number >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise bad("optimizer", "must be 'adamw' or 'sgd'")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if not self.budget_tiers or any(not 0.0 <= t <= 1.0 for t in self.budget_tiers):
            raise bad("budget_tiers", "must be a non-empty list of fractions in [0, 1]")
        if self.budgets is not None and len(self.budgets) != self.num_clients:
            raise ConfigError(
                f"FederatedConfig.budgets has {len(self.budgets)} entries but num_clients is {self.num_clients}"
            )
        for cid, kind in self.faults.items():
            if kind not in ("raise", "nan", "shape"):
                raise ConfigError(f"FederatedConfig.faults[{cid!r}] must be raise|nan|shape, got {kind!r}")
            # clients look their fault up as faults[str(cid)]: any other key would silently never fire
            if not (cid.isdigit() and int(cid) < self.num_clients):
                raise ConfigError(f"FederatedConfig.faults key must be a client id in 0..{self.num_clients - 1}, "
                                  f"got {cid!r}")
        if self.task is not None and self.task not in TASK_KINDS:
            raise bad("task", f"must be None (inferred) or one of {list(TASK_KINDS)}")
        for name, lo in (("eval_every", 1), ("eval_last", 1), ("max_new_tokens", 1), ("gen_eval_per_task", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, f"must be an integer >= {lo}")
        roles = ("text", "label", "instruction", "input", "output", "task")
        for role, column in self.columns.items():
            if role not in roles or not isinstance(column, str) or not column:
                raise ConfigError(f"FederatedConfig.columns maps a role in {roles} to a column name, got "
                                  f"{role!r}: {column!r}")

    # ------------------------------------------------------------------ helpers
    def evaluates_at(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` (1-based) runs the expensive evaluation (``eval_every``, ``eval_last``)."""
        return round_idx % self.eval_every == 0 or round_idx > self.rounds - self.eval_last

    def partition_spec(self) -> tuple[str, float | None]:
        kind, _, arg = self.partition.partition(":")
        if kind not in PARTITIONS:
            raise ConfigError(
                f"FederatedConfig.partition must be iid, task, dirichlet:<alpha> or pathological:<k>, "
                f"got {self.partition!r}"
            )
        if kind in ("iid", "task"):
            return kind, None
        try:
            value = float(arg) if arg else (0.5 if kind == "dirichlet" else 2.0)
        except ValueError:
            raise ConfigError(f"FederatedConfig.partition has a non-numeric parameter: {self.partition!r}") from None
        if value <= 0 or (kind == "pathological" and value != int(value)):
            raise ConfigError(f"FederatedConfig.partition parameter must be positive (an integer for "
                              f"pathological), got {self.partition!r}")
        return kind, value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)  # YAML keys may be ints: `1: 2` must not crash sorted()
        if unknown:
            raise ConfigError(f"unknown FederatedConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> FederatedConfig:
        """Load a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file (a ``[federated]`` TOML table is accepted)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
            raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    # yaml's message spans several lines; keep its first line and the 1-based position
                    mark = getattr(exc, "problem_mark", None)
                    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                    raise ConfigError(f"cannot parse config file {str(path)!r}{where}: {problem}") from exc
                data = {} if data is None else data
            elif path.suffix == ".toml":
                data = tomllib.loads(text)
                data = data.get("federated", data)
            else:
                data = json.loads(text)
        except ConfigError:
            raise
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot parse config file {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from exc

    def with_overrides(self, overrides: dict[str, str] | list[str]) -> FederatedConfig:
        """Copy with fields replaced from strings (``{"rounds": "3"}`` or ``["rounds=3"]``), parsed by type."""
        if isinstance(overrides, list):
            pairs = {}
            for item in overrides:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(f"override {item!r} must look like key=value")
                pairs[key.strip().replace("-", "_")] = value
            overrides = pairs
        data = self.to_dict()
        hints = typing.get_type_hints(type(self))
        for key, raw in overrides.items():
            key = key.replace("-", "_")
            if key not in data:
                raise ConfigError(f"unknown FederatedConfig key {key!r}; valid keys: {sorted(data)}")
            data[key] = _parse_value(key, raw, hints[key])
        return type(self).from_dict(data)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint (the annotations are strings under ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if hint is Any:
        return "any value"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits ``hint`` (ints widened to float, int mapping keys to str as YAML writes them), else
    a ConfigError quoting the key, the value and its type."""

    def bad() -> ConfigError:
        return ConfigError(f"FederatedConfig.{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                # a container of the one allowed type: its own message names the bad item (budgets[2])
                if len(options) == 1 and isinstance(value, list | tuple | dict):
                    raise
        raise bad()
    if hint in (bool, int, float, str):
        # bool is an int subclass: True is no int and no float here; an int is a fine float (lr: 1)
        ok = isinstance(value, int | float) if hint is float else isinstance(value, hint)
        if ok and (hint is bool or not isinstance(value, bool)):
            return float(value) if hint is float else value
        raise bad()
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad()
        (item,) = args or (Any,)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        k_hint, v_hint = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if k_hint is str and isinstance(k, int) and not isinstance(k, bool):
                k = str(k)  # YAML reads `faults: {3: nan}` with an int key
            out[_check_type(f"{key} key", k, k_hint)] = _check_type(f"{key}[{k!r}]", v, v_hint)
        return out
    return value


def _parse_value(key: str, raw: Any, hint: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if raw.lower() in ("none", "null") and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if origin in (typing.Union, type(None)) or (
        args and type(None) in args) else hint
    b_origin = typing.get_origin(base)
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is str:
            return raw
        if b_origin is list:
            if raw.strip().startswith("["):
                return json.loads(raw)
            (item,) = typing.get_args(base)
            items = [s.strip() for s in raw.split(",") if s.strip()]
            return [float(s) if item is float else int(s) if item is int else s for s in items]
        if b_origin is dict:
            if raw.strip().startswith("{"):
                return json.loads(raw)
            out = {}
            for part in raw.split(","):
                k, _, v = part.partition(":")
                out[k.strip()] = v.strip()
            return out
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"cannot parse value {raw!r} for FederatedConfig.{key} ({hint})") from None
    return raw
