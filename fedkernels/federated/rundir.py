"""`RunDirectory`: one run's output folder: its lock, fresh / overwrite / resume, metrics, stale temp files.

The folder holds ``config.json``, ``metrics.jsonl`` (one JSON line per committed round), ``checkpoints/``
(`fedkernels.federated.checkpoint`), at the end ``summary.json`` and ``adapter/``, and while a run is live
``run.lock``. Both engines (in-process and Flower) open it through `FederatedTrainer.begin_run`.

- **Lock**: ``run.lock`` holds the owner's pid, host, process start time and wall-clock start. It is created with
  a hard link from a complete temp file, so it is never seen half-written. A lock whose process is gone (same
  host, pid dead or reused by a process that started later) is stale: it is taken over with a warning. A lock of
  a live process is a `RunLockedError`.
- **Fresh start** in a folder that already holds a run's files is a `RunFolderError` unless ``overwrite``, which
  first deletes those files (never anything else in the folder).
- **Metrics**: the whole file is rewritten atomically every round (about 2 KiB a round: 100 rounds rewrite
  200 KiB), so a crash or a full disk leaves the old file or the new one, never a torn line. A torn last line
  left by an older version or by an outside copy is dropped on resume with a warning naming the file.
- **Temp files** that a killed run leaves (``.NAME.*.tmp`` beside ``LATEST``, ``summary.json``, ``config.json``,
  ``metrics.jsonl`` and inside ``adapter/``, and ``.tmp-round-*`` folders) are deleted when the next run takes
  the lock; they are never read.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from fedkernels.errors import CheckpointError, RunFolderError, RunLockedError
from fedkernels.federated.checkpoint import TMP_PREFIX
from fedkernels.io import TEMP_GLOB, atomic_write_bytes

__all__ = ["RunDirectory", "RUN_FILES", "LOCK_NAME"]

log = logging.getLogger("fedkernels.federated")

LOCK_NAME = "run.lock"
# what a run writes into its folder: their presence means "holds a run"; --overwrite deletes exactly these
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "adapter", "config.json",
             "merged_base_weights.safetensors", "flower_bytes.json")

_HELD: set[str] = set()  # lock files this process holds (a lock with our own pid but not in here is stale)


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name in () may hold spaces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirectory:
    """The output folder of one run (see the module docstring).

    Args:
        root: the folder; created if missing.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.lock_path = self.root / LOCK_NAME
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"

    # ------------------------------------------------------------------ lock
    @property
    def locked(self) -> bool:
        """Whether this process holds the lock."""
        return str(self.lock_path.resolve()) in _HELD

    def acquire(self) -> None:
        """Take ``run.lock`` for this process.

        Raises:
            RunLockedError: a live process (or one on another host) holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        key = str(self.lock_path.resolve())
        if key in _HELD:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            for _ in range(3):
                try:
                    os.link(tmp, self.lock_path)  # atomic: fails if the lock exists
                    _HELD.add(key)
                    atexit.register(self.release)  # a run that raised still frees the folder when Python exits
                    return
                except FileExistsError:
                    self._break_if_stale()
            raise RunLockedError(f"could not take the lock {str(self.lock_path)!r}: it keeps reappearing")
        finally:
            os.unlink(tmp)

    def _break_if_stale(self) -> None:
        try:
            owner = json.loads(self.lock_path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # never written by `acquire` (which links a complete file): someone else's; refuse to guess
            raise RunLockedError(f"run folder {str(self.root)!r} has an unreadable lock file {str(self.lock_path)!r} "
                                 f"({exc}); delete it if no run uses the folder") from exc
        if host != socket.gethostname():
            raise RunLockedError(f"run folder {str(self.root)!r} is locked by pid {pid} on host {host!r} since "
                                 f"{owner.get('started')}; if that run is gone, delete {str(self.lock_path)!r}")
        same_proc = _alive(pid) and (owner.get("proc_start") is None or owner.get("proc_start") == _proc_start(pid))
        if same_proc and not (pid == os.getpid() and str(self.lock_path.resolve()) not in _HELD):
            raise RunLockedError(f"run folder {str(self.root)!r} is in use by another run (pid {pid} on {host}, "
                                 f"since {owner.get('started')}); wait for it to end or use another --output_dir")
        log.warning("taking over the stale lock %s of pid %d (started %s), which is no longer running",
                    self.lock_path, pid, owner.get("started"))
        self.lock_path.unlink(missing_ok=True)

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        key = str(self.lock_path.resolve())
        if key in _HELD:
            _HELD.discard(key)
            self.lock_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ opening
    def run_files(self) -> list[str]:
        """The names of `RUN_FILES` present in the folder."""
        return [n for n in RUN_FILES if (self.root / n).exists()]

    def open_fresh(self, *, overwrite: bool = False) -> None:
        """Start a new run here: refuse a folder holding another run, unless ``overwrite`` (then delete it)."""
        found = self.run_files()
        if found and not overwrite:
            raise RunFolderError(f"output folder {str(self.root)!r} already holds a run ({', '.join(found)}); "
                                 "continue it with --resume, replace it with --overwrite, or pick another "
                                 "--output_dir")
        for name in found:
            p = self.root / name
            log.warning("--overwrite: deleting %s", p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def clean_temp(self) -> list[Path]:
        """Delete the temp files a killed run left (module docstring); returns what was deleted."""
        gone: list[Path] = []
        for folder in (self.root, self.checkpoints, self.root / "adapter"):
            if not folder.is_dir():
                continue
            for p in folder.glob(TEMP_GLOB):
                if p.is_file() and not p.name.startswith(f".{LOCK_NAME}."):
                    p.unlink(missing_ok=True)
                    gone.append(p)
        if self.checkpoints.is_dir():
            for p in self.checkpoints.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
        for p in self.root.glob(f".{LOCK_NAME}.*.tmp"):  # a lock attempt killed before its unlink
            p.unlink(missing_ok=True)
            gone.append(p)
        if gone:
            log.warning("removed %d stale temp file(s) left by an interrupted run: %s", len(gone),
                        ", ".join(str(p) for p in gone))
        return gone

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> list[dict]:
        """The committed rounds' metrics; a torn last line is dropped (and the file rewritten) with a warning.

        Raises:
            CheckpointError: a line before the last is not a JSON object (named by file and line number).
        """
        if not self.metrics_path.exists():
            return []
        raw = self.metrics_path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # after a final "\n" the tail is b""
        out: list[dict] = []
        for i, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                if i == len(complete) and not tail.strip():
                    tail = line  # the last line is bad although newline-terminated: torn as well
                    break
                raise CheckpointError(f"{str(self.metrics_path)!r} line {i} is not JSON ({exc}); "
                                      "the file is damaged before its last line") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise CheckpointError(f"{str(self.metrics_path)!r} line {i} is not a round record: {line[:80]!r}")
            out.append(rec)
        if tail.strip():
            log.warning("%s ends in a torn line (%d bytes, %r...): dropped", self.metrics_path, len(tail), tail[:40])
            self.write_metrics(out)
        return out

    def write_metrics(self, history: list[dict]) -> None:
        """Replace metrics.jsonl by ``history``, atomically."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history).encode())
