"""Atomic file writes and safe tensor loading (safetensors only, never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedkernels.errors import AdapterFormatError, NonFiniteError
from solvers.errors import os_error_naming

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_safetensors", "load_safetensors", "fsync_dir",
           "sha256_file", "TEMP_GLOB"]

TEMP_GLOB = ".*.tmp"  # the temp files `atomic_write_bytes` / `atomic_save_safetensors` leave if killed mid-write

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk names no file: say which one we were writing
            raise os_error_naming(exc, path) from exc
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """`safetensors.torch.save_file` through a temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk names no file: say which one we were writing
            raise os_error_naming(exc, path) from exc
        raise
    fsync_dir(path.parent)


def load_safetensors(path: str | os.PathLike, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickle formats and (by default) NaN/Inf values.

    safetensors itself does not check values for NaN/Inf (its README says so), so we do.

    Raises:
        AdapterFormatError: a pickle-format path, a missing file, or a malformed safetensors file.
        NonFiniteError: a tensor contains NaN or Inf (the key is named).
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFormatError(
            f"refusing to load {str(path)!r}: pickle-based formats can run code on load; "
            "convert the adapter to safetensors (peft: save_pretrained(safe_serialization=True))"
        )
    if not path.is_file():
        raise AdapterFormatError(f"adapter file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(path)!r} is not a valid safetensors file: {exc}") from exc
    if check_finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"tensor {key!r} in {str(path)!r} contains NaN or Inf")
    return tensors
