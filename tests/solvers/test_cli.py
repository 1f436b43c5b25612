"""`plan` CLI: a config file gives a table, JSON and PNG; bad budgets are rejected with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from solvers.cli import app
from solvers.memory import MemoryModel

runner = CliRunner()

CONFIG = """\
model: bert-tiny
batch_size: 4
seq_len: 32
rank: 8
targets: [query, value]
strategy: fedpilot
backend: dp
tiers: [{lo}, {mid}, {hi}]
num_clients: 5
"""


@pytest.fixture(scope="module")
def tiers():
    mm = MemoryModel.from_config("bert-tiny", batch_size=4, seq_len=32, rank=8, targets=["query", "value"],
                                 padded=True)
    lo, hi = mm.min_trainable_bytes(), mm.full_bytes()
    return mm, [lo, (lo + hi) // 2, hi]


def test_plan_from_config_writes_table_json_png(tmp_path, tiers):
    mm, (lo, mid, hi) = tiers
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(CONFIG.format(lo=lo, mid=mid, hi=hi))
    out_json, out_png = tmp_path / "plans.json", tmp_path / "heat.png"
    res = runner.invoke(app, ["plan", "--config", str(cfg), "--json", str(out_json), "--png", str(out_png)],
                        env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "fedpilot" in res.output and "optimal" in res.output
    data = json.loads(out_json.read_text())
    plans = data["plans"]
    assert [p["client"] for p in plans] == [0, 1, 2, 3, 4]
    assert [p["budget"] for p in plans] == [lo, mid, hi, lo, mid]
    for p in plans:
        assert p["predicted_bytes"] <= p["budget"]
        assert p["predicted_bytes"] == mm.predict(p["modules"])
    assert len(plans[2]["modules"]) == len(mm.modules)  # the top tier trains everything
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 1000


def test_command_line_overrides_and_other_formats(tmp_path, tiers):
    mm, (lo, mid, hi) = tiers
    cfg = tmp_path / "plan.toml"
    cfg.write_text(f'model = "bert-tiny"\nbatch_size = 4\nseq_len = 32\nrank = 8\nbudgets = ["{hi}"]\n')
    out = tmp_path / "o.json"
    res = runner.invoke(app, ["plan", "--config", str(cfg), "--strategy", "fedhello-gd:triangle",
                              "--budgets", f"{lo},{hi}", "--json", str(out)])
    assert res.exit_code == 0, res.output
    plans = json.loads(out.read_text())["plans"]
    assert [p["budget"] for p in plans] == [lo, hi] and plans[0]["backend"] == "fedhello-gd:triangle"
    csv_file = tmp_path / "b.csv"
    csv_file.write_text(f"client,budget\n0,{mid}\n1,{hi}\n")
    res = runner.invoke(app, ["plan", "--model", "gpt2", "--batch-size", "1", "--seq-len", "16",
                              "--budgets", str(csv_file), "--strategy", "full", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["plans"]) == 2


@pytest.mark.parametrize("bad", ["12x", "-3GiB", "lots"])
def test_bad_budgets_rejected_cleanly(bad, tmp_path):
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--budgets", f"1GiB,{bad}"])
    assert res.exit_code == 2
    assert repr(bad) in res.output or bad in res.output
    assert "Traceback" not in res.output


def test_other_errors_are_one_line(tmp_path, tiers):
    _, (lo, _, _) = tiers
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--batch-size", "4", "--seq-len", "32",
                              "--budgets", str(lo - 1)])
    assert res.exit_code == 2 and "client 0" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--budgets", "8GiB", "--strategy", "fedmagic"])
    assert res.exit_code == 2 and "fedmagic" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: bert-tiny\nbudgetz: [1GiB]\n")
    res = runner.invoke(app, ["plan", "--config", str(bad)])
    assert res.exit_code == 2 and "budgetz" in res.output


def test_mounted_in_fedkernels_cli():
    fk = pytest.importorskip("fedkernels.cli")
    names = {c.name or c.callback.__name__ for c in fk.app.registered_commands}
    assert "plan" in names


def test_budget_csv_ids_kept_duplicates_rejected_and_huge_budget_typed(tmp_path):
    out = tmp_path / "o.json"
    csv_file = tmp_path / "b.csv"
    csv_file.write_text("client,budget\n0,4GiB\n5,8GiB\n9,16GiB\n")
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16",
                              "--budgets", str(csv_file), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert [p["client"] for p in json.loads(out.read_text())["plans"]] == [0, 5, 9]
    csv_file.write_text("client,budget\n0,4GiB\n5,8GiB\n0,16GiB\n")
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--budgets", str(csv_file)])
    assert res.exit_code == 2 and "b.csv:4: duplicate client id 0" in res.output.replace("\n", "")
    for bad in ("1e308TiB", "nan", "-1GiB"):
        res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--budget", bad])
        assert res.exit_code == 2 and bad in res.output and "Traceback" not in res.output, (bad, res.output)
        assert not isinstance(res.exception, OverflowError)


def test_plan_table_prints_dtype_and_peak_with_user_default_dtype():
    res = runner.invoke(app, ["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16",
                              "--budget", "1GiB"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "float32" in flat and "peak" in flat
    assert MemoryModel.from_config("llama-7b", batch_size=1, seq_len=8, rank=8).dtype == "bfloat16"
    assert MemoryModel.from_config("bert-tiny", batch_size=1, seq_len=8, rank=8).dtype == "float32"
