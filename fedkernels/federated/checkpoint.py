"""Atomic round checkpoints: a new folder is written beside the old, fsynced, renamed, then LATEST moves.

A reader only ever follows LATEST, which names a folder that was complete before LATEST was replaced, so
a run killed at any point (mid-step, mid-aggregation, mid-write) resumes from the last whole round.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fedkernels.io import atomic_save_safetensors, atomic_write_bytes, fsync_dir, load_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

KEEP = 2  # round folders kept; older ones are deleted after LATEST moves


def save_checkpoint(root: str | os.PathLike, round_idx: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_idx:05d}"
    tmp = root / f".tmp-round-{round_idx:05d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    atomic_save_safetensors(tensors, tmp / "state.safetensors")
    atomic_write_bytes(tmp / "state.json", json.dumps(meta, sort_keys=True).encode())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_bytes(root / "LATEST", final.name.encode())
    rounds = sorted(p for p in root.glob("round-*") if p.is_dir())
    for old in rounds[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    tensors = load_safetensors(path / "state.safetensors", check_finite=False)
    meta = json.loads((path / "state.json").read_text())
    return tensors, meta


def global_tensors(global_state, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global adapter under the checkpoint's names: ``global.<module>.A|B`` and ``head.<key>`` (the names
    ``state.safetensors`` uses, and the Flower engine's `ArrayRecord` of each round)."""
    out: dict[str, torch.Tensor] = {}
    for m, (A, B) in global_state.factors.items():
        out[f"global.{m}.A"] = A
        out[f"global.{m}.B"] = B
    out.update({f"head.{k}": v for k, v in head.items()})
    return out
