"""peft interop: export our adapters so vanilla peft loads them, convert peft models, load adapters.

Export layout follows peft 0.21 `save_pretrained` (read from its output, see ../shared/docs/ecosystem.md
section 3): ``adapter_config.json`` (peft_type LORA, ``r``/``lora_alpha`` plus ``rank_pattern`` /
``alpha_pattern`` for modules that differ) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and whole ``modules_to_save`` modules as
``base_model.model.<module>.<param>``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from fedkernels.errors import AdapterFormatError, ShapeError, UnknownModuleError
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
    for name, mod in list(base.named_modules()):
        if isinstance(mod, ModulesToSaveWrapper):
            adapter = mod.active_adapters[0]
            _set_submodule(base, name, mod.modules_to_save[adapter])
        elif isinstance(mod, LoraLayer) and hasattr(mod, "base_layer"):
            adapter = mod.active_adapters[0]
            A = mod.lora_A[adapter].weight.detach()
            B = mod.lora_B[adapter].weight.detach()
            r = int(mod.r[adapter])
            dropout = mod.lora_dropout[adapter]
            layer = LoRALinear(mod.get_base_layer(), r=r, alpha=float(mod.scaling[adapter]) * r,
                               dropout=float(getattr(dropout, "p", 0.0)))
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            layer.trainable = mod.lora_A[adapter].weight.requires_grad
            _set_submodule(base, name, layer)
    return base


def load_adapter(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict[str, int]:
    """Load a peft-format LoRA adapter (folder or ``.safetensors`` file) into ``model``'s `LoRALinear`s.

    Pickle files are refused. A module's rank in the file may be below the layer's maximum: the first
    ranks are filled and the active rank set. B is rescaled when the file's scale (from
    ``adapter_config.json``) differs from the layer's, so the product is what the file describes.
    Returns module -> loaded rank.

    Raises:
        AdapterFormatError, NonFiniteError, UnknownModuleError, ShapeError.
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
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    layers = lora_modules(model)
    saved = _save_modules(model)
    loaded: dict[str, int] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m is None:
            other[k] = t
            continue
        name, which = m.group(1), m.group(2)
        if name not in layers:
            if strict:
                raise UnknownModuleError(f"adapter key {key!r}: module {name!r} is not a LoRA module of the model")
            continue
        layer = layers[name]
        rank = t.shape[0] if which == "A" else t.shape[1]
        if rank > layer.r:
            raise ShapeError(f"adapter {name!r} has rank {rank} in the file but the layer's maximum rank is {layer.r}")
        expect = (rank, layer.in_features) if which == "A" else (layer.out_features, rank)
        if tuple(t.shape) != expect:
            raise ShapeError(f"adapter key {key!r} has shape {tuple(t.shape)}, expected {expect} for module {name!r}")
        with torch.no_grad():
            if which == "A":
                layer.lora_A.zero_()
                layer.lora_A[:rank].copy_(t)
            else:
                file_scale = _file_scale(cfg, name, rank)
                factor = file_scale / layer.scale if file_scale is not None else 1.0
                layer.lora_B.zero_()
                layer.lora_B[:, :rank].copy_(t * factor)
        layer.set_active_rank(rank)
        loaded[name] = rank
    for k, t in other.items():
        owner = next((n for n in saved if k.startswith(n + ".")), None)
        if owner is None:
            if strict:
                raise UnknownModuleError(f"adapter key {k!r} belongs to no LoRA module or modules_to_save entry")
            continue
        param = saved[owner].get_parameter(k[len(owner) + 1:])
        with torch.no_grad():
            param.copy_(t)
    return loaded


def _file_scale(cfg: dict, name: str, rank: int) -> float | None:
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha", rank)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?(?:{pat})$", name):
            alpha = a
            break
    return alpha / (rank**0.5) if cfg.get("use_rslora") else alpha / rank
