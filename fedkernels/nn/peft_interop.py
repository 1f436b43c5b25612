"""peft interop: export our adapters so vanilla peft loads them, convert peft models, load adapters.

Export layout follows peft 0.21 `save_pretrained` (read from its output, see ../shared/docs/ecosystem.md
section 3): ``adapter_config.json`` (peft_type LORA, ``r``/``lora_alpha`` plus ``rank_pattern`` /
``alpha_pattern`` for modules that differ) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and whole ``modules_to_save`` modules as
``base_model.model.<module>.<param>``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from fedkernels.errors import AdapterFormatError, NonFiniteError, ShapeError, UnknownModuleError
from fedkernels.io import PICKLE_SUFFIXES, atomic_save_safetensors, atomic_write_json, load_safetensors
from fedkernels.nn.inject import _set_submodule, lora_modules
from fedkernels.nn.lora import LoRALinear

__all__ = ["export_peft", "from_peft", "load_adapter", "exported_factors"]

PREFIX = "base_model.model."


def exported_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) restricted to the ranks in use (prefix or non-prefix mask): the product is unchanged."""
    keep = layer.effective_mask().bool()
    return layer.lora_A.detach()[keep], layer.lora_B.detach()[:, keep]


def _save_modules(model: nn.Module) -> dict[str, nn.Module]:
    cfg = getattr(model, "_fedkernels_lora_config", None)
    out: dict[str, nn.Module] = {}
    for keep in getattr(cfg, "modules_to_save", []) or []:
        for name, mod in model.named_modules():
            if name == keep or name.endswith("." + keep):
                out[name] = mod
    return out


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    modules: list[str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``model``'s adapters as a peft LoRA adapter that `peft.PeftModel.from_pretrained` loads.

    Each module is exported at the ranks it uses (its active rank or mask), so heterogeneous plans
    become ``rank_pattern`` entries; ``alpha_pattern`` reproduces our scale exactly (alpha_k = scale * r_k,
    rsLoRA folded in the same way). Modules whose product is exactly zero (never trained, B = 0, or
    rank 0) are left out: excluding them changes no output. ``modules`` restricts the export further.
    ``task_type`` (peft's, e.g. ``"CAUSAL_LM"``) makes `PeftModel.from_pretrained` return the matching
    wrapper (`PeftModelForCausalLM`, which generates).

    Returns the folder written. Files are written atomically.
    """
    path = Path(path)
    layers = lora_modules(model)
    if modules is not None:
        unknown = sorted(set(modules) - set(layers))
        if unknown:
            raise UnknownModuleError(f"export_peft: modules {unknown} are not LoRA modules of the model")
        layers = {n: layers[n] for n in modules}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for name, layer in layers.items():
        A, B = exported_factors(layer)
        if A.shape[0] == 0 or not torch.any(B != 0):
            continue
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        ranks[name] = int(A.shape[0])
        alphas[name] = layer.scale * ranks[name]
        fan_in_fan_out |= layer.fan_in_fan_out
    if not ranks:
        raise AdapterFormatError("export_peft: no LoRA module has a non-zero update; nothing to export")
    saved = _save_modules(model)
    for name, mod in saved.items():
        for pname, p in mod.named_parameters():
            tensors[f"{PREFIX}{name}.{pname}"] = p.detach()
    (r0, a0), _ = Counter((ranks[n], alphas[n]) for n in ranks).most_common(1)[0]
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != r0}
    alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != a0}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": 0.0,
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in ranks) + ")$",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in saved}) or None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_json(path / "adapter_config.json", config)
    return path


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Turn a peft LoRA model into a plain model with `LoRALinear` layers, weights preserved.

    Uses the active adapter. peft's ``ModulesToSaveWrapper`` is replaced by its trained copy.
    Returns the underlying base model (modified in place).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not isinstance(base, nn.Module):
        raise AdapterFormatError(f"from_peft expects a peft model (an nn.Module), got {type(peft_model).__name__}")
    todo: list[tuple[str, nn.Module]] = []
    for name, mod in list(base.named_modules()):  # check every adapter first: a refusal leaves the model as it was
        if isinstance(mod, ModulesToSaveWrapper):
            todo.append((name, mod.modules_to_save[mod.active_adapters[0]]))
        elif isinstance(mod, LoraLayer) and hasattr(mod, "base_layer"):
            todo.append((name, _from_lora_layer(name, mod)))
    for name, new in todo:
        _set_submodule(base, name, new)
    return base


def _from_lora_layer(name: str, mod: nn.Module) -> LoRALinear:
    """A `LoRALinear` equal to peft ``LoraLayer`` ``mod``'s active adapter, after checking its rank, scale and
    factors (ShapeError / NonFiniteError / AdapterFormatError naming the module)."""
    adapter = mod.active_adapters[0]
    A = mod.lora_A[adapter].weight.detach()
    B = mod.lora_B[adapter].weight.detach()
    r = mod.r[adapter]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise AdapterFormatError(f"from_peft: module {name!r} has rank {r!r}, expected an integer in 1..{MAX_RANK}")
    scaling = _real(mod.scaling[adapter], f"from_peft: module {name!r} scaling", lo=0.0, hi=MAX_SCALE)
    dropout = mod.lora_dropout[adapter]
    layer = LoRALinear(mod.get_base_layer(), r=r, alpha=scaling * r, dropout=float(getattr(dropout, "p", 0.0)))
    for which, t, expect in (("A", A, (r, layer.in_features)), ("B", B, (layer.out_features, r))):
        if tuple(t.shape) != expect:
            raise ShapeError(f"from_peft: module {name!r} lora_{which} has shape {tuple(t.shape)}, expected {expect}")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"from_peft: module {name!r} lora_{which} contains NaN or Inf")
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.trainable = mod.lora_A[adapter].weight.requires_grad
    return layer


# Bounds on adapter_config.json numbers. peft's own defaults give scales alpha/r of 0.25..2 (alpha 8..32 at r 8..64);
# 1e4 leaves four orders of magnitude for hand-made adapters while keeping B * scale far from the fp16 maximum
# (65504) for |B| <= 1. Ranks above 2**16 exceed any hidden size of a released model (the largest is 53248).
MAX_SCALE = 1e4
MAX_RANK = 2**16
_REGEX_SYNTAX = set("*+?{}[]()|\\")


def _literal_key(pattern: str, where: str) -> tuple[str, bool]:
    r"""The module name a ``rank_pattern`` / ``alpha_pattern`` key stands for, and whether it is anchored at the
    start (``^``). Keys are module names as peft writes them (``q_proj``, ``model.layers.0.q_proj``, or
    `re.escape`-d by `export_peft`): backslash escapes and unescaped dots are read literally. Any other regex syntax
    is refused rather than run: peft matches keys with ``re.match(rf"(.*\.)?({key})$", name)``, and a pattern such
    as ``(a+)+$`` backtracks for hours on a 40-character name (issue 12 item 13)."""
    if not isinstance(pattern, str) or not pattern:
        raise AdapterFormatError(f"{where}: key {pattern!r} must be a non-empty module name")
    out: list[str] = []
    anchored = pattern.startswith("^")
    body = pattern[1:] if anchored else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body) and not body[i + 1].isalnum():
            out.append(body[i + 1])
            i += 2
            continue
        if c in _REGEX_SYNTAX or c in "^$":
            raise AdapterFormatError(
                f"{where}: key {pattern!r} is a regular expression ({c!r} at {i}); fedkernels matches pattern keys "
                "literally or by dotted suffix (module names), as export_peft writes them"
            )
        out.append(c)
        i += 1
    if not out:
        raise AdapterFormatError(f"{where}: key {pattern!r} names no module")
    return "".join(out), anchored


def _pattern_value(patterns: dict[str, tuple[str, bool, object]], name: str) -> object | None:
    r"""Value of the first key naming ``name`` exactly or as a dotted suffix (peft's ``(.*\.)?key$`` for a literal
    key, which is what `_literal_key` returns); None when no key matches."""
    for lit, anchored, value in patterns.values():
        if name == lit or (not anchored and name.endswith("." + lit)):
            return value
    return None


def _real(value: object, where: str, *, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterFormatError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{where} = {value!r} is not finite")
    if not lo < v <= hi:
        raise AdapterFormatError(f"{where} = {value!r} is outside ({lo:g}, {hi:g}]")
    return v


def _rank(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise AdapterFormatError(f"{where} must be an integer rank in 1..{MAX_RANK}, got {value!r}")
    return int(value)


class _AdapterConfig:
    """The parts of a peft ``adapter_config.json`` the loader uses, validated once: default ``r`` / ``lora_alpha``,
    ``rank_pattern`` / ``alpha_pattern`` (literal keys, see `_literal_key`) and ``use_rslora``. Every failure is
    an AdapterFormatError (NonFiniteError for NaN/Inf) naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        self.present = path.exists()
        raw: object = {}
        if self.present:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise AdapterFormatError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise AdapterFormatError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
        where = f"{str(path)!r}"
        self.r = _rank(raw["r"], f"{where} key 'r'") if raw.get("r") is not None else None
        alpha = raw.get("lora_alpha")
        self.alpha = None if alpha is None else _real(alpha, f"{where} key 'lora_alpha'", lo=0.0,
                                                      hi=MAX_SCALE * MAX_RANK)
        rs = raw.get("use_rslora", False)
        if not isinstance(rs, bool) and rs is not None:
            raise AdapterFormatError(f"{where} key 'use_rslora' must be true or false, got {rs!r}")
        self.use_rslora = bool(rs)
        self.rank_pattern = self._patterns(raw, "rank_pattern")
        self.alpha_pattern = self._patterns(raw, "alpha_pattern")

    def _patterns(self, raw: dict, key: str) -> dict[str, tuple[str, bool, object]]:
        pats = raw.get(key) or {}
        where = f"{str(self.path)!r} key {key!r}"
        if not isinstance(pats, dict):
            raise AdapterFormatError(f"{where} must be a JSON object (module -> value), got {type(pats).__name__}")
        return {k: (*_literal_key(k, where), v) for k, v in pats.items()}

    def rank(self, name: str) -> int | None:
        """The rank the config declares for module ``name`` (None: no config, or no ``r``)."""
        v = _pattern_value(self.rank_pattern, name)
        if v is not None:
            return _rank(v, f"{str(self.path)!r} key 'rank_pattern' for module {name!r}")
        return self.r

    def scale(self, name: str, rank: int) -> float | None:
        """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) of module ``name`` at ``rank``; None without a config."""
        if not self.present:
            return None
        v = _pattern_value(self.alpha_pattern, name)
        if v is not None:
            alpha = _real(v, f"{str(self.path)!r} key 'alpha_pattern' for module {name!r}", lo=0.0,
                          hi=MAX_SCALE * MAX_RANK)
        else:
            alpha = float(rank) if self.alpha is None else self.alpha
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        if not scale <= MAX_SCALE:
            raise AdapterFormatError(f"{str(self.path)!r}: module {name!r} would get the LoRA scale {scale:g} "
                                     f"(alpha {alpha:g}, rank {rank}), above {MAX_SCALE:g}")
        return scale


def load_adapter(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict[str, int]:
    """Load a peft-format LoRA adapter (folder or ``.safetensors`` file) into ``model``'s `LoRALinear`s.

    Pickle files are refused. A module's rank in the file may be below the layer's maximum: the first
    ranks are filled and the active rank set. B is rescaled when the file's scale (from
    ``adapter_config.json``) differs from the layer's, so the product is what the file describes.
    ``modules_to_save`` tensors must match the model's parameter shapes exactly (no broadcasting).
    Everything is checked before the model is changed, so a refused adapter leaves the model as it was.
    Returns module -> loaded rank.

    Raises:
        AdapterFormatError: malformed file, config (JSON, types, out-of-range ``r`` / ``lora_alpha``, regex pattern
            keys), or an A without its B.
        NonFiniteError: NaN/Inf in a tensor or in ``lora_alpha`` / ``alpha_pattern``.
        UnknownModuleError: a key for a module the model does not have (``strict``).
        ShapeError: a tensor whose shape does not fit its module, or A and B of different ranks.
    """
    path = Path(path)
    if path.is_dir():
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if not (path / "adapter_model.safetensors").exists():
            found = f" (found pickle files {pickles}, refused)" if pickles else ""
            raise AdapterFormatError(f"{str(path)!r} has no adapter_model.safetensors{found}")
        cfg_path = path / "adapter_config.json"
        file = path / "adapter_model.safetensors"
    else:
        cfg_path = path.with_name("adapter_config.json")
        file = path
    tensors = load_safetensors(file)
    cfg = _AdapterConfig(cfg_path)
    where = f"{str(file)!r}"
    layers = lora_modules(model)
    saved = _save_modules(model)
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    params: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m is None:
            owner = next((n for n in saved if k.startswith(n + ".")), None)
            param = None
            if owner is not None:
                try:
                    param = saved[owner].get_parameter(k[len(owner) + 1:])
                except AttributeError:
                    param = None
            if param is None:
                if strict:
                    raise UnknownModuleError(f"{where} key {key!r} belongs to no LoRA module or modules_to_save "
                                             "parameter of the model")
                continue
            if tuple(t.shape) != tuple(param.shape):
                raise ShapeError(f"{where} key {key!r} has shape {tuple(t.shape)}, the model's parameter "
                                 f"{owner}.{k[len(owner) + 1:]} has {tuple(param.shape)} (no broadcasting)")
            if not t.is_floating_point():
                raise AdapterFormatError(f"{where} key {key!r} has dtype {t.dtype}, expected floating point")
            params.append((key, param, t))
            continue
        name, which = m.group(1), m.group(2)
        if name not in layers:
            if strict:
                raise UnknownModuleError(f"{where} key {key!r}: module {name!r} is not a LoRA module of the model")
            continue
        if t.dim() != 2 or not t.is_floating_point():
            raise ShapeError(f"{where} key {key!r} must be a 2-d floating-point matrix, got shape {tuple(t.shape)} "
                             f"{t.dtype}")
        if which in factors.setdefault(name, {}):
            raise AdapterFormatError(f"{where} keys {factors[name][which][0]!r} and {key!r} both give lora_{which} "
                                     f"of module {name!r}")
        factors[name][which] = (key, t)
    plan: list[tuple[str, LoRALinear, torch.Tensor, torch.Tensor, int, float]] = []
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))[0]
            raise AdapterFormatError(f"{where} key {have!r}: module {name!r} has lora_{next(iter(pair))} but no "
                                     f"lora_{'B' if 'A' in pair else 'A'}")
        layer = layers[name]
        (kA, A), (kB, B) = pair["A"], pair["B"]
        rank = int(A.shape[0])
        if int(B.shape[1]) != rank:
            raise ShapeError(f"{where} keys {kA!r} / {kB!r}: A has rank {rank} but B has rank {int(B.shape[1])} "
                             f"(module {name!r})")
        if rank > layer.r:
            raise ShapeError(f"{where} key {kA!r}: module {name!r} has rank {rank} in the file but the layer's "
                             f"maximum rank is {layer.r}")
        for k, t, expect in ((kA, A, (rank, layer.in_features)), (kB, B, (layer.out_features, rank))):
            if tuple(t.shape) != expect:
                raise ShapeError(f"{where} key {k!r} has shape {tuple(t.shape)}, expected {expect} for module "
                                 f"{name!r}")
        declared = cfg.rank(name)
        if declared is not None and declared != rank:
            raise ShapeError(f"{where} key {kA!r}: module {name!r} has rank {rank} but {str(cfg_path)!r} declares "
                             f"rank {declared} (r / rank_pattern)")
        file_scale = cfg.scale(name, rank)
        factor = file_scale / layer.scale if file_scale is not None else 1.0
        if not math.isfinite(factor) or not torch.isfinite(B.double() * factor).all():
            raise NonFiniteError(f"{where} key {kB!r}: B rescaled by {factor:g} (file scale / layer scale) is not "
                                 f"finite in module {name!r}")
        plan.append((name, layer, A, B, rank, factor))
    with torch.no_grad():
        for _, layer, A, B, rank, factor in plan:
            layer.lora_A.zero_()
            layer.lora_A[:rank].copy_(A)
            layer.lora_B.zero_()
            layer.lora_B[:, :rank].copy_(B * factor)
            layer.set_active_rank(rank)
        for _, param, t in params:
            param.copy_(t)
    return {name: rank for name, _, _, _, rank, _ in plan}
