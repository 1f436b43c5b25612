"""`LoRAConfig` and `inject_lora`: put `LoRALinear` adapters into any transformers (or torch) model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from fedkernels.errors import ConfigError, UnknownModuleError
from fedkernels.nn.lora import LoRALinear, _is_conv1d
from fedkernels.ops._backend import check_backend

__all__ = ["LoRAConfig", "inject_lora", "lora_modules", "layer_index", "find_targets"]

_LAYER_RE = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(module_name: str, layers_pattern: str | None = None) -> int | None:
    """Transformer block index in a dotted module name (``...layer.3.attention...`` -> 3), or None."""
    if layers_pattern:
        m = re.search(rf"\.{re.escape(layers_pattern)}\.(\d+)\.", f".{module_name}.")
    else:
        m = _LAYER_RE.search(f".{module_name}.")
    return int(m.group(1)) if m else None


@dataclass
class LoRAConfig:
    """Which modules get a LoRA adapter, and at which rank.

    Args:
        r: default (maximum) rank of every adapter.
        alpha: LoRA alpha; the scale is alpha / r (alpha / sqrt(r) with ``use_rslora``).
        dropout: LoRA dropout on the adapter path.
        target_modules: module-name suffixes (``["query", "value"]``: matches ``...attention.self.query``)
            or one regex string matched against the full dotted name with ``re.fullmatch`` (peft's rule).
        rank_pattern: regex -> rank for modules whose rank differs from ``r`` (searched in the full name).
        alpha_pattern: regex -> alpha likewise.
        layers_to_transform: only blocks with these indices get adapters (None: all).
        layers_pattern: name of the block list (``"layer"``, ``"layers"``, ``"h"``); guessed when None.
        modules_to_save: modules kept fully trainable and exported whole (e.g. a classifier head).
        use_rslora: rank-stabilised scaling.
        backend: compute backend of the layers ("auto", "torch", "triton").
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError(
                    f"LoRAConfig.target_modules is not a valid regex: {self.target_modules!r} ({exc})"
                ) from exc
        elif not self.target_modules:
            raise ConfigError("LoRAConfig.target_modules is empty; name at least one module")
        for pat, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"LoRAConfig.rank_pattern[{pat!r}] must be a positive integer, got {rank!r}")
        check_backend(self.backend, "LoRAConfig.backend")

    def matches(self, name: str) -> bool:
        """True when the module called ``name`` is a LoRA target under this config."""
        if isinstance(self.target_modules, str):
            hit = re.fullmatch(self.target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in self.target_modules)
        if hit and self.layers_to_transform is not None:
            idx = layer_index(name, self.layers_pattern)
            hit = idx is not None and idx in self.layers_to_transform
        return hit

    def rank_for(self, name: str) -> int:
        for pat, rank in self.rank_pattern.items():
            if re.search(pat, name):
                return rank
        return self.r

    def alpha_for(self, name: str) -> float:
        for pat, alpha in self.alpha_pattern.items():
            if re.search(pat, name):
                return alpha
        return self.alpha


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linear (or `Conv1D`) modules that ``config`` targets, in model order."""
    return [
        name
        for name, mod in model.named_modules()
        if name and (isinstance(mod, nn.Linear) or _is_conv1d(mod)) and config.matches(name)
    ]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, config: LoRAConfig, *, freeze_base: bool = True) -> dict[str, LoRALinear]:
    """Replace every targeted linear layer of ``model`` by a `LoRALinear`, in place.

    All other parameters are frozen (``freeze_base``) except those of ``config.modules_to_save``.
    Returns the new layers by full module name.

    Raises:
        UnknownModuleError: a target or a ``modules_to_save`` entry matches no module of the model.
    """
    targets = find_targets(model, config)
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
        raise UnknownModuleError(
            f"target_modules {config.target_modules!r} match no linear layer of {type(model).__name__}; "
            f"linear layers are e.g. {linear[:6]}"
        )
    if isinstance(config.target_modules, list):
        for t in config.target_modules:
            if not any(n == t or n.endswith("." + t) for n in targets):
                raise UnknownModuleError(f"target module {t!r} matches no linear layer of {type(model).__name__}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    layers: dict[str, LoRALinear] = {}
    for name in targets:
        base = model.get_submodule(name)
        layer = LoRALinear(
            base,
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            backend=config.backend,
        )
        _set_submodule(model, name, layer)
        layers[name] = layer
    for keep in config.modules_to_save:
        hits = [n for n, _ in model.named_modules() if n == keep or n.endswith("." + keep)]
        if not hits:
            raise UnknownModuleError(f"modules_to_save entry {keep!r} matches no module of {type(model).__name__}")
        for n in hits:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    model._fedkernels_lora_config = config  # remembered for export_peft
    return layers


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in ``model`` by full dotted name (the names plans and aggregation use)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}

