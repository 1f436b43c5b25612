"""`fedkernels demo`, `compare` and `export` end to end on tiny settings (tiny-bert, 3 clients, 1 round)."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedkernels.cli import SUITE_NAMES, app

TINY = ["--model", "tiny-bert", "--max_examples", "60", "--num_clients", "3", "--fraction", "1", "--rounds", "1",
        "--local_steps", "1", "--batch_size", "4", "--seq_len", "16", "--max_eval", "12", "--lora_rank", "2",
        "--lora_alpha", "4"]


@pytest.fixture
def invoke(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str):
        res = CliRunner().invoke(app, list(args))
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return res

    return run


def rows(path):
    return list(csv.DictReader(path.open()))


def test_demo_runs_its_three_strategies_with_overrides(invoke, tmp_path):
    res = invoke("demo", *TINY, "--partition", "iid", "--output_dir", "demo")
    assert res.exit_code == 0, res.output
    assert "tiny-bert on bbc-news, 3 clients in 3 memory tiers, iid, 1 rounds" in res.stdout
    table = rows(tmp_path / "demo" / "compare.csv")
    assert [(r["strategy"], r["partition"], r["seeds"]) for r in table] == [
        ("fedit-min", "iid", "1"), ("fedpilot", "iid", "1"), ("fedra", "iid", "1")]
    for r in table:
        assert 0.0 <= float(r["accuracy_mean"]) <= 1.0 and float(r["mb_up_mean"]) > 0
        metrics = tmp_path / "demo" / f"{r['strategy']}__iid__seed0" / "metrics.jsonl"
        (line,) = metrics.read_text().splitlines()
        assert float(r["accuracy_mean"]) == pytest.approx(json.loads(line)["accuracy"])
    assert (tmp_path / "demo" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for s in ("fedpilot", "fedit-min", "fedra"):
        assert s in res.stdout


def test_compare_table_has_a_column_per_partition(invoke, tmp_path):
    res = invoke("compare", "--strategies", "fedit-full,fedra", "--partition", "iid,pathological:2", *TINY,
                 "--output_dir", "cmp")
    assert res.exit_code == 0, res.output
    table = rows(tmp_path / "cmp" / "compare.csv")
    assert sorted((r["strategy"], r["partition"]) for r in table) == [
        ("fedit-full", "iid"), ("fedit-full", "pathological:2"), ("fedra", "iid"), ("fedra", "pathological:2")]
    header = next(x for x in res.stdout.splitlines() if "strategy" in x)
    assert "iid" in header and "pathological:2" in header
    fedra_row = next(x for x in res.stdout.splitlines() if x.strip("│ ").startswith("fedra"))
    for r in table:
        if r["strategy"] == "fedra":
            assert f"{100 * float(r['accuracy_mean']):.1f} ± 0.0" in fedra_row
    assert {p.name for p in (tmp_path / "cmp").iterdir()} >= {
        "compare.csv", "compare.png", "fedra__pathological-2__seed0", "fedit-full__iid__seed0"}


def test_compare_refuses_an_unknown_strategy_in_one_line(invoke):
    res = invoke("compare", "--strategies", "fedpilot,fedx", *TINY, "--output_dir", "cmp")
    assert res.exit_code == 2
    assert "'fedx'" in res.stderr and "Traceback" not in res.stderr


def test_export_writes_the_latest_checkpoint_as_a_peft_adapter(invoke, tmp_path):
    res = invoke("train", *TINY, "--output_dir", "run")
    assert res.exit_code == 0, res.output
    res = invoke("export", "run", "out")
    assert res.exit_code == 0, res.output
    assert "exported round 1 to" in res.stdout
    # where under OUT the adapter lands is issue 12 item 18's to settle; what it holds is checked here
    (weights,) = (tmp_path / "out").rglob("adapter_model.safetensors")
    config = json.loads((weights.parent / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    exported, final = load_file(weights), load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == final.keys() and any("lora_A" in k for k in exported)
    for k in final:
        assert torch.equal(exported[k], final[k]), k


def test_demo_instruct_runs_its_four_strategies_on_the_lm_task(invoke, tmp_path):
    """`demo --task instruct` under tiny overrides (tiny-llama on a 3-task file): the four strategies, ROUGE-L as
    the headline column, per-task ROUGE-L / EM columns equal to the runs' last metrics records."""
    from tests.federated.test_llm_runs import instructions

    instructions().to_json(str(tmp_path / "ins.jsonl"), lines=True)
    tiny = ["--model", "tiny-llama", "--dataset", "ins.jsonl", "--max_examples", "48", "--seq_len", "24",
            "--batch_size", "2", "--local_steps", "1", "--num_clients", "3", "--fraction", "1", "--rounds", "1",
            "--eval_every", "1", "--gen_eval_per_task", "2", "--max_new_tokens", "3", "--max_eval", "12",
            "--lora_rank", "4", "--output_dir", "demo"]
    res = invoke("demo", "--task", "instruct", *tiny)
    assert res.exit_code == 0, res.output
    assert "tiny-llama on ins.jsonl, 3 clients in 3 memory tiers, task, 1 rounds" in res.stdout
    table = rows(tmp_path / "demo" / "compare.csv")
    assert sorted(r["strategy"] for r in table) == ["fedit-min", "fedpilot", "flexlora", "flora"]
    for r in table:
        (line,) = (tmp_path / "demo" / f"{r['strategy']}__task__seed0" / "metrics.jsonl").read_text().splitlines()
        rec = json.loads(line)
        assert float(r["rougeL_mean"]) == pytest.approx(rec["rougeL"])
        for t in ("echo", "copy", "say"):
            assert float(r[f"rougeL/{t}"]) == pytest.approx(rec[f"rougeL/{t}"])
            assert float(r[f"exact_match/{t}"]) == pytest.approx(rec[f"exact_match/{t}"])
    assert "rougeL" in res.stdout and "exact_match/echo" in res.stdout
    assert invoke("demo", "--task", "seq2seq").exit_code == 2


def test_suite_help_names_every_protocol_and_only_those(invoke):
    from fedkernels.federated.suite import PROTOCOLS

    assert sorted(SUITE_NAMES) == sorted(PROTOCOLS)
    res = invoke("compare", "--help")
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    for name in PROTOCOLS:
        assert name in flat, name
