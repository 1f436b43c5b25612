"""`fedkernels train` / `export` on run folders, as a user runs them (subprocesses)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedkernels.federated.rundir import RunDirectory
from tests.federated.test_trainer import BASE

ROOT = Path(__file__).resolve().parent.parent


def cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fedkernels.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def said(res):
    """stdout + stderr with line wrapping undone (rich wraps the error line at the terminal width)."""
    return " ".join((res.stdout + res.stderr).split())


def write_config(path, **kw):
    path.write_text(json.dumps({**BASE, "rounds": 1, **kw}))
    return path


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_round_run(tmp_path_factory):
    """A finished 1-round run with a relative output_dir ("run"), made from folder ``a``."""
    base = tmp_path_factory.mktemp("cli")
    (base / "a").mkdir()
    cfg = write_config(base / "a" / "cfg.json", output_dir="run")
    res = cli(["train", "--config", str(cfg)], cwd=base / "a")
    assert res.returncode == 0, res.stdout + res.stderr
    return base / "a" / "run"


def test_resume_of_a_moved_run_writes_only_into_the_moved_folder(one_round_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(one_round_run, moved)
    before = tree_digest(one_round_run)
    other_cwd = tmp_path / "elsewhere"
    other_cwd.mkdir()
    # from another folder, where the relative output_dir "run" of config.json means nothing
    res = cli(["train", "--resume", str(moved), "--rounds", "2"], cwd=other_cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [json.loads(x)["round"] for x in (moved / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (moved / "checkpoints" / "LATEST").read_text() == "round-00002"
    assert json.loads((moved / "summary.json").read_text())["rounds"] == 2
    assert tree_digest(one_round_run) == before, "the original run was modified"
    assert not (other_cwd / "run").exists()


def test_fresh_run_in_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(one_round_run, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(one_round_run, work / "run")
    (work / "run" / "checkpoints" / "round-00007").mkdir()  # an older, longer run's folder
    cfg = write_config(work / "cfg.json", output_dir="run")
    before = tree_digest(work / "run")
    res = cli(["train", "--config", str(cfg)], cwd=work)
    assert res.returncode != 0
    err = said(res)
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert tree_digest(work / "run") == before
    res = cli(["train", "--config", str(cfg), "--overwrite"], cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == ["LATEST", "round-00001"]
    assert [json.loads(x)["round"] for x in (work / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_second_concurrent_run_gets_a_clear_error(one_round_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_round_run, run)
    live = RunDirectory(run)
    live.acquire()  # this (live) test process is "the first run"
    try:
        before = tree_digest(run)
        res = cli(["train", "--resume", str(run), "--rounds", "2"], cwd=tmp_path)
    finally:
        live.release()
    assert res.returncode != 0
    err = said(res)
    assert "in use by another run" in err and f"pid {os.getpid()}" in err and "Traceback" not in err
    assert {k: v for k, v in tree_digest(run).items() if k != "run.lock"} == \
        {k: v for k, v in before.items() if k != "run.lock"}


def test_export_writes_the_adapter_into_out(one_round_run, tmp_path):
    out = tmp_path / "exported"
    res = cli(["export", str(one_round_run), str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "adapter").exists()


def test_a_run_where_every_client_fails_exits_non_zero_with_a_summary(tmp_path):
    cfg = write_config(tmp_path / "cfg.json", output_dir=str(tmp_path / "run"), fraction=1.0,
                       faults={str(c): "raise" for c in range(BASE["num_clients"])})
    res = cli(["train", "--config", str(cfg)], cwd=tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "every client failed" in said(res)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] is True and summary["adapter"] is None
    assert not (tmp_path / "run" / "run.lock").exists()
