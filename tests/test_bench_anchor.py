"""bench/anchor_sft.py --quick: our trainer and the peft/FedAvg reference both train on the same workload, and the
results JSON carries the comparison (time and memory ratios measured in the same run, ROUGE-L of both)."""

import json
import math

import pytest
import torch

from bench import anchor_sft


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("anchor") / "anchor.json"
    result = anchor_sft.main(["--quick", "--out", str(out)])
    return result, json.loads(out.read_text())


def test_quick_json_has_both_sides_and_the_ratios(quick):
    result, saved = quick
    assert saved["ours_errors"] == {}, saved["ours_errors"]
    sides = {(r["side"], r["strategy"]) for r in saved["rows"]}
    assert sides == {("ours", "fedit-full"), ("peft/FedAvg", "fedavg (every module)")}
    assert saved["workload"]["model"] == "tiny-llama" and saved["workload"]["num_clients"] == 2
    for row in saved["rows"]:
        assert len(row["round_s"]) == saved["workload"]["rounds"] == 1
        assert row["s_per_round"] > 0 and row["train_s_per_round"] > 0
        assert set(row["peak_bytes"]) == {"0", "1"} and all(b > 0 for b in row["peak_bytes"].values())
        assert 0.0 <= row["rougeL"] <= 1.0 and math.isfinite(row["eval_loss"])
    ratio = saved["ratios"]["fedit-full"]
    ours, peft = saved["rows"]
    assert ratio["time"] == pytest.approx(ours["s_per_round"] / peft["s_per_round"])
    assert ratio["cpu_time"] == pytest.approx(ours["cpu_s_per_round"] / peft["cpu_s_per_round"])
    assert ratio["memory_max"] == pytest.approx(ours["peak_mib_max"] / peft["peak_mib_max"])
    assert ratio["rougeL_diff"] == pytest.approx(ours["rougeL"] - peft["rougeL"])
    assert "| ours fedit-full |" in anchor_sft.table(result)


def test_quick_both_sides_trained_the_same_clients_on_the_same_split(quick):
    _, saved = quick
    assert saved["split_source"] == "trainer" and saved["split_matches_standalone"] == {"fedit-full": True}
    ours, peft = saved["rows"]
    assert ours["rounds"][0]["sampled"] == peft["rounds"][0]["sampled"]
    for row in (ours, peft):
        # the global adapter moved away from its start (B starts at zero, so any step changes it)
        assert row["adapter_delta_norm"] > 0, row["side"]
    # the same start, batches, lr and FedAvg weights: fedit-full and peft FedAvg land on the same adapter
    assert saved["fedit_full_vs_peft_max_abs_diff"] < 1e-4


def test_fedavg_weights_by_sample_count_and_rejects_mismatched_keys():
    a = {"k": torch.tensor([0.0, 4.0])}
    b = {"k": torch.tensor([4.0, 0.0])}
    got = anchor_sft.fedavg([a, b], [1, 3])
    assert torch.allclose(got["k"], torch.tensor([3.0, 1.0]))
    with pytest.raises(KeyError, match="adapter keys differ"):
        anchor_sft.fedavg([a, {"j": torch.zeros(2)}], [1, 1])
