"""RunDirectory: the run-folder lock, fresh / overwrite, torn metrics, stale temp files."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from fedkernels.errors import CheckpointError, RunFolderError, RunLockedError
from fedkernels.federated.rundir import LOCK_NAME, RunDirectory


def records(n):
    return [{"round": r, "accuracy": 0.5, "loss": 1.0} for r in range(1, n + 1)]


def test_torn_last_metrics_line_is_dropped_and_the_file_repaired(tmp_path, caplog):
    rd = RunDirectory(tmp_path)
    rd.write_metrics(records(2))
    with rd.metrics_path.open("a") as fh:
        fh.write('{"round": 3, "accur')  # disk full mid-append
    with caplog.at_level(logging.WARNING, "fedkernels.federated"):
        got = rd.read_metrics()
    assert [h["round"] for h in got] == [1, 2]
    assert any(str(rd.metrics_path) in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    assert rd.metrics_path.read_text().count("\n") == 2 and rd.read_metrics() == got


def test_torn_line_with_a_newline_is_dropped_too(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.metrics_path.write_text(json.dumps(records(1)[0]) + '\n{"round": 2, "acc\n')
    assert [h["round"] for h in rd.read_metrics()] == [1]


def test_damage_before_the_last_line_is_a_typed_error_naming_the_line(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.metrics_path.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl' line 2"):
        rd.read_metrics()


def test_metrics_are_replaced_atomically(tmp_path, monkeypatch):
    rd = RunDirectory(tmp_path)
    rd.write_metrics(records(2))
    before = rd.metrics_path.read_bytes()

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        rd.write_metrics(records(3))
    assert rd.metrics_path.read_bytes() == before  # the old file, whole
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temp_files_are_removed_on_the_next_start(tmp_path):
    rd = RunDirectory(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-round-00003").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-round-00003" / "state.json").write_text("{")
    (tmp_path / "adapter").mkdir()
    stale = [tmp_path / "checkpoints" / ".LATEST.abc123.tmp", tmp_path / ".summary.json.x9.tmp",
             tmp_path / "adapter" / ".adapter_model.safetensors.q1.tmp", tmp_path / ".metrics.jsonl.z.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = tmp_path / "adapter" / "adapter_model.safetensors"
    keep.write_bytes(b"whole")
    gone = rd.clean_temp()
    assert set(gone) == {*stale, tmp_path / "checkpoints" / ".tmp-round-00003"}
    assert not any(p.exists() for p in gone) and keep.read_bytes() == b"whole"


def test_fresh_start_in_a_folder_holding_a_run_is_refused_and_overwrite_clears_it(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.open_fresh()  # empty: fine
    (tmp_path / "checkpoints" / "round-00005").mkdir(parents=True)
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "notes.txt").write_text("mine")  # not a run file: never touched
    with pytest.raises(RunFolderError, match=f"{tmp_path}.*checkpoints.*summary.json.*--overwrite"):
        rd.open_fresh()
    rd.open_fresh(overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _holder(path):
    """A live process that holds the lock of ``path`` until killed."""
    code = ("import sys, time; from fedkernels.federated.rundir import RunDirectory; "
            f"RunDirectory({str(path)!r}).acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_folder_gets_a_clear_error(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"{tmp_path}.*in use.*pid {proc.pid}"):
            RunDirectory(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = _holder(tmp_path)
    proc.kill()  # kill -9: the lock file stays behind
    proc.wait()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == proc.pid
    rd = RunDirectory(tmp_path)
    with caplog.at_level(logging.WARNING, "fedkernels.federated"):
        rd.acquire()
    assert rd.locked and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and str(proc.pid) in r.getMessage() for r in caplog.records)
    rd.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_left_by_this_process_but_not_held_is_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                  "proc_start": None, "started": time.ctime()}))
    rd = RunDirectory(tmp_path)
    rd.acquire()  # e.g. a trainer in this process that raised before releasing it
    assert rd.locked
    rd.release()


def test_a_lock_of_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunLockedError, match="host 'elsewhere'"):
        RunDirectory(tmp_path).acquire()
