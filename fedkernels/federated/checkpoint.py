"""Round checkpoints and the one schema of a run's state, shared by the in-process and the Flower engine.

Writes are atomic: a new folder is written beside the old, fsynced, renamed, then LATEST moves. A reader follows
LATEST, which names a folder that was complete before LATEST was replaced, so a run killed at any point (mid-step,
mid-aggregation, mid-write) resumes from the last whole round.

Reads trust nothing: every folder carries ``digests.json`` (SHA-256 of ``state.safetensors`` and ``state.json``),
checked on load; `RunState.from_tensors` checks that every key is there, the metadata types and ranges, tensor
shapes and that every tensor is finite. `load_latest` falls back to the previous good round, with a warning naming
the bad file, when the latest one fails any check, or when LATEST is missing or points outside the folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save as safetensors_bytes

from fedkernels.errors import CheckpointError
from fedkernels.io import atomic_write_bytes, fsync_dir, load_safetensors, sha256_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_latest", "round_folders",
           "verify_digests", "RunState", "KEEP", "DIGESTS", "TMP_PREFIX"]

log = logging.getLogger("fedkernels.federated")

KEEP = 2  # round folders kept (the newest and one to fall back to); older ones are deleted after LATEST moves
DIGESTS = "digests.json"
FILES = ("state.safetensors", "state.json")
TMP_PREFIX = ".tmp-round-"
_ROUND = re.compile(r"round-(\d{5,})")

T = TypeVar("T")


def _round_of(name: str) -> int | None:
    m = _ROUND.fullmatch(name)
    return int(m.group(1)) if m else None


def round_folders(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(round, folder)`` of every ``round-NNNNN`` folder in ``root``, by round number (not by name: a name
    sort puts round-100000 before round-99999), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(r, p) for p in root.iterdir() if p.is_dir() and (r := _round_of(p.name)) is not None]
    return sorted(out, key=lambda t: t[0], reverse=True)


def save_checkpoint(root: str | os.PathLike, round_idx: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write round ``round_idx`` atomically (see the module docstring); keep the `KEEP` newest rounds up to it.

    Folders of later rounds are deleted too: they belong to a history this run left (it fell back from a bad
    checkpoint, or was restarted with ``--overwrite``), and a later fallback must never pick them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_idx:05d}"
    tmp = root / f"{TMP_PREFIX}{round_idx:05d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    data = {
        "state.safetensors": safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
        "state.json": json.dumps(meta, sort_keys=True).encode(),
    }
    for name, blob in data.items():
        atomic_write_bytes(tmp / name, blob)
    atomic_write_bytes(tmp / DIGESTS, json.dumps({n: sha256_file(tmp / n) for n in FILES}, sort_keys=True).encode())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_bytes(root / "LATEST", final.name.encode())
    kept = 0
    for r, folder in round_folders(root):
        kept += r <= round_idx
        if r > round_idx or kept > KEEP:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def verify_digests(path: str | os.PathLike) -> None:
    """Check ``digests.json`` of checkpoint folder ``path`` against its files.

    Raises:
        CheckpointError: a file or the digest list is missing, or a file's SHA-256 differs (both named).
    """
    path = Path(path)
    dfile = path / DIGESTS
    try:
        digests = json.loads(dfile.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {DIGESTS}: not written by this version, or torn")\
            from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(dfile)!r} is unreadable: {exc}") from exc
    if not isinstance(digests, dict):
        raise CheckpointError(f"{str(dfile)!r} must hold an object, got {type(digests).__name__}")
    for name in FILES:
        f = path / name
        if name not in digests:
            raise CheckpointError(f"{str(dfile)!r} has no digest for {name!r}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        got = sha256_file(f)
        if got != digests[name]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: SHA-256 {got[:16]}... differs from "
                                  f"{str(digests[name])[:16]}... recorded in {DIGESTS}")


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder LATEST names, if it is a round folder inside ``root`` that exists; else None (unverified)."""
    root = Path(root)
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    name = latest.read_text(errors="replace").strip()
    if _round_of(name) is None:  # "../other-run/round-00003", "/abs/path": outside this run folder
        return None
    path = root / name
    return path if (path / "state.json").is_file() else None


def load_latest(root: str | os.PathLike, validate: Callable[[dict[str, torch.Tensor], dict, Path], T]
                ) -> tuple[Path, T]:
    """Load the newest good checkpoint in ``root``: LATEST's folder first, then the others, newest first.

    ``validate(tensors, meta, folder)`` turns a verified folder into the caller's state and raises
    `CheckpointError` if it is not usable. A folder that fails a check is skipped with a warning naming it.

    Raises:
        CheckpointError: no folder passed (every failure is listed).
    """
    root = Path(root)
    latest_file = root / "LATEST"
    candidates: list[Path] = []
    named = latest_checkpoint(root)
    if named is not None:
        candidates.append(named)
    elif latest_file.is_file():
        log.warning("checkpoint pointer %s names %r, which is not a round folder in %s: using the newest good "
                    "round folder instead", latest_file, latest_file.read_text(errors="replace").strip()[:200], root)
    elif round_folders(root):
        log.warning("checkpoint pointer %s is missing: using the newest good round folder instead", latest_file)
    candidates += [p for _, p in round_folders(root) if p not in candidates]
    errors: list[str] = []
    for folder in candidates:
        try:
            tensors, meta = load_checkpoint(folder)
            state = validate(tensors, meta, folder)
        except ValueError as exc:  # CheckpointError, AdapterFormatError, NonFiniteError; JSON of a forged digest
            log.warning("checkpoint %s is unusable, falling back to the previous one: %s", folder, exc)
            errors.append(f"{folder.name}: {exc}")
            continue
        if errors:
            log.warning("resuming from %s (skipped %d bad checkpoint(s))", folder, len(errors))
        return folder, state
    if not candidates:
        raise CheckpointError(f"no checkpoint in {str(root)!r}")
    raise CheckpointError(f"no usable checkpoint in {str(root)!r}: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------- the state schema
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "round": int, "config": dict, "rule_meta": dict, "starts": dict, "planner": dict, "budgets": dict,
}


@dataclass
class RunState:
    """Everything a run needs to continue bitwise-identically after its last committed round.

    Tensor keys in ``state.safetensors``: ``global.{m}.A|B`` (global factors), ``head.{k}`` (head state dict),
    ``base.{m}`` (frozen base weights, only for a rule that mutates them), ``rule.{k}`` (tensor entries of the
    aggregation state), ``start.{cid}.{m}.A|B`` (per-client start factors), ``rng.torch``. The rest goes to
    ``state.json``: ``round``, ``config``, ``rule_meta`` (non-tensor aggregation state), ``starts`` (client id ->
    modules of its start), ``planner``, ``budgets``.
    """

    round: int
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor]
    rule_state: dict[str, Any]
    rng: torch.Tensor
    planner: dict
    budgets: dict
    base: dict[str, torch.Tensor] | None = None
    starts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)`` as `save_checkpoint` takes them."""
        tensors: dict[str, torch.Tensor] = {}
        for m, (A, B) in self.factors.items():
            tensors[f"global.{m}.A"] = A
            tensors[f"global.{m}.B"] = B
        for k, v in self.head.items():
            tensors[f"head.{k}"] = v
        for m, w in (self.base or {}).items():
            tensors[f"base.{m}"] = w
        rule_meta = {}
        for k, v in self.rule_state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"rule.{k}"] = v
            else:
                rule_meta[k] = v
        tensors["rng.torch"] = self.rng
        starts = {}
        for cid, st in self.starts.items():
            for m, (A, B) in st.items():
                tensors[f"start.{cid}.{m}.A"] = A
                tensors[f"start.{cid}.{m}.B"] = B
            starts[str(cid)] = list(st)
        meta = {"round": int(self.round), "config": self.config, "rule_meta": rule_meta, "starts": starts,
                "planner": self.planner, "budgets": self.budgets}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, *, expected: dict[str, torch.Size],
                     base_modules: list[str] | None = None, source: str | os.PathLike = "checkpoint"
                     ) -> RunState:
        """Parse and check a loaded checkpoint.

        Args:
            expected: key -> shape of every ``global.*`` and ``head.*`` tensor the model needs.
            base_modules: modules whose ``base.{m}`` must be present (a rule that mutates the base), else None.
            source: the folder, for the messages.

        Raises:
            CheckpointError: a missing key, a wrong type or shape, a round outside 0..config rounds, a NaN/Inf
                tensor; the message names the file, the key and the value.
        """
        sj, st = Path(source) / "state.json", Path(source) / "state.safetensors"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{str(sj)!r} must hold an object, got {type(meta).__name__}")
        for key, typ in _META_TYPES.items():
            if key not in meta:
                raise CheckpointError(f"{str(sj)!r} has no key {key!r}")
            if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
                raise CheckpointError(f"{str(sj)!r}: {key!r} must be {typ.__name__}, got {meta[key]!r:.80}")
        rounds = meta["config"].get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise CheckpointError(f"{str(sj)!r}: 'config.rounds' must be an int, got {rounds!r}")
        if not 0 <= meta["round"] <= rounds:
            raise CheckpointError(f"{str(sj)!r}: 'round' = {meta['round']} is outside 0..{rounds} (config.rounds)")

        def need(key: str, shape: torch.Size | None = None) -> torch.Tensor:
            if key not in tensors:
                raise CheckpointError(f"{str(st)!r} has no tensor {key!r}")
            t = tensors[key]
            if shape is not None and tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{str(st)!r}: tensor {key!r} has shape {tuple(t.shape)}, the model needs "
                                      f"{tuple(shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{str(st)!r}: tensor {key!r} contains NaN or Inf")
            return t

        for key, shape in expected.items():
            need(key, shape)
        for key in tensors:  # the optional ones (rule state, client starts) must be finite too
            need(key)
        modules = sorted({k[7:-2] for k in expected if k.startswith("global.")})
        factors = {m: (tensors[f"global.{m}.A"], tensors[f"global.{m}.B"]) for m in modules}
        head = {k[5:]: tensors[k] for k in expected if k.startswith("head.")}
        base = {m: need(f"base.{m}") for m in base_modules} if base_modules is not None else None
        rule_state = dict(meta["rule_meta"])
        rule_state.update({k[5:]: v for k, v in tensors.items() if k.startswith("rule.")})
        starts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for cid, mods in meta["starts"].items():
            if not re.fullmatch(r"\d+", str(cid)) or not isinstance(mods, list):
                raise CheckpointError(f"{str(sj)!r}: 'starts' entry {cid!r}: {mods!r:.80} is not client id -> "
                                      "list of modules")
            starts[int(cid)] = {m: (need(f"start.{cid}.{m}.A"), need(f"start.{cid}.{m}.B")) for m in mods}
        rng = need("rng.torch")
        if rng.dtype != torch.uint8 or rng.dim() != 1:
            raise CheckpointError(f"{str(st)!r}: tensor 'rng.torch' must be a 1-d uint8 RNG state, got "
                                  f"{rng.dtype} of shape {tuple(rng.shape)}")
        return cls(round=int(meta["round"]), config=meta["config"], factors=factors, head=head,
                   rule_state=rule_state, rng=rng, planner=meta["planner"], budgets=meta["budgets"],
                   base=base, starts=starts)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    verify_digests(path)
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
