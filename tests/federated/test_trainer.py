"""End-to-end federated runs on a tiny random-init BERT (real BBC texts, bundled tokenizer)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedkernels.federated import STRATEGIES, FederatedConfig, FederatedTrainer

BASE = dict(model="tiny-bert", max_examples=240, num_clients=6, fraction=0.5, rounds=2, local_steps=2,
            batch_size=4, seq_len=32, lora_rank=4, lora_alpha=8, lr=5e-3, budget_tiers=[0.1, 0.5, 1.0],
            max_eval=60, partition="dirichlet:0.5")


def cfg(tmp_path, name="run", **kw):
    return FederatedConfig(**{**BASE, "output_dir": str(tmp_path / name), **kw})


# A client's measured peak (CPU: the profiler's allocation events, `solvers.measure`) is a measurement, not a
# training output: CI once saw the same plan measured 5,296,152 and 5,295,636 B (516 B, 0.01 %) in two identical
# runs in one process while everything else matched bit for bit. It is compared to this relative tolerance.
MEASURED_RTOL = 1e-3


def comparable(history):
    """Metrics without wall-clock fields and without the measured peaks (see `assert_same_history`)."""
    out = []
    for h in history:
        h = {k: v for k, v in h.items() if k not in ("timings", "wall_s")}
        h["clients"] = [{k: v for k, v in c.items() if k not in ("wall_s", "measured_bytes")} for c in h["clients"]]
        out.append(h)
    return out


def measured(history):
    return [[c.get("measured_bytes") for c in h["clients"]] for h in history]


def assert_same_history(got, want):
    """Two histories equal in every field but wall-clock ones, measured peaks within `MEASURED_RTOL`."""
    assert comparable(got) == comparable(want)
    for g_round, w_round in zip(measured(got), measured(want), strict=True):
        for g, w in zip(g_round, w_round, strict=True):
            assert (g is None) == (w is None), (g, w)
            if w is not None:
                assert g == pytest.approx(w, rel=MEASURED_RTOL), (g, w)


def global_factors(trainer):
    return {m: (A.clone(), B.clone()) for m, (A, B) in trainer.global_state.factors.items()}


def assert_same_factors(a, b):
    assert a.keys() == b.keys()
    for m in a:
        assert torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]), m


def test_two_runs_are_identical_and_another_seed_differs(tmp_path):
    t1 = FederatedTrainer(cfg(tmp_path, "a"))
    s1 = t1.run()
    t2 = FederatedTrainer(cfg(tmp_path, "b"))
    s2 = t2.run()
    assert_same_history(s1.history, s2.history)
    assert_same_factors(global_factors(t1), global_factors(t2))
    t3 = FederatedTrainer(cfg(tmp_path, "c", seed=1))
    s3 = t3.run()
    assert comparable(s3.history) != comparable(s1.history)
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_one_round(tmp_path, strategy):
    trainer = FederatedTrainer(cfg(tmp_path, strategy=strategy, rounds=1))
    before = global_factors(trainer)
    base = {m: layer.base_layer.weight.detach().clone() for m, layer in trainer.layers.items()}
    summary = trainer.run()
    rec = summary.history[0]
    assert not rec["skipped"] and rec["succeeded"] and rec["bytes_up"] > 0
    assert 0.0 <= rec["accuracy"] <= 1.0 and math.isfinite(rec["loss"])
    after = global_factors(trainer)
    base_moved = [m for m, layer in trainer.layers.items() if not torch.equal(base[m], layer.base_layer.weight)]
    merged_file = tmp_path / "run" / "merged_base_weights.safetensors"
    if trainer.rule.mutates_base:  # FLoRA: the round went into the base and the adapters restarted (B = 0)
        assert base_moved and all(not B.any() for _, B in after.values())
        assert merged_file.is_file()
    else:
        assert not base_moved and not merged_file.exists()
        assert any(not torch.equal(before[m][1], after[m][1]) or not torch.equal(before[m][0], after[m][0])
                   for m in before)


def test_every_client_measured_memory_fits_its_budget(tmp_path):
    trainer = FederatedTrainer(cfg(tmp_path, fraction=1.0, rounds=1, measure_memory=True))
    rec = trainer.run().history[0]
    measured = [c for c in rec["clients"] if c.get("measured_bytes")]
    assert len(measured) == 6
    for c in measured:
        assert c["measured_bytes"] <= c["budget"], c
        assert c["planned_bytes"] <= c["budget"], c
    # the tiers really differ: the smallest client trains fewer modules than the largest
    mods = {c["budget"]: c["modules"] for c in rec["clients"]}
    assert mods[min(mods)] < mods[max(mods)]


def test_bad_clients_are_rejected_and_logged_and_round_goes_on(tmp_path, caplog):
    faults = {"0": "raise", "1": "nan", "2": "shape"}
    trainer = FederatedTrainer(cfg(tmp_path, fraction=1.0, rounds=1, faults=faults, min_fit_fraction=0.5))
    rec = trainer.run().history[0]
    assert not rec["skipped"]
    assert rec["succeeded"] == [3, 4, 5]
    reasons = {f["client"]: f["reason"] for f in rec["failures"]}
    assert set(reasons) == {0, 1, 2}
    assert "crashed" in reasons[0] and ("NaN" in reasons[1] or "finite" in reasons[1]) and "shape" in reasons[2]
    assert any("client 0 failed" in r.message for r in caplog.records)


def test_round_below_min_fit_fraction_is_skipped_and_global_unchanged(tmp_path):
    faults = {"0": "raise", "1": "nan", "2": "shape"}
    trainer = FederatedTrainer(cfg(tmp_path, fraction=1.0, rounds=1, faults=faults, min_fit_fraction=0.9))
    before = global_factors(trainer)
    head = {k: v.clone() for k, v in trainer.global_head.items()}
    rec = trainer.run().history[0]
    assert rec["skipped"]
    assert_same_factors(before, global_factors(trainer))
    assert all(torch.equal(head[k], trainer.global_head[k]) for k in head)


def test_budget_too_small_stops_before_round_one(tmp_path):
    from solvers.errors import InfeasibleBudgetError

    budgets = ["10GiB"] * 5 + ["1KiB"]
    with pytest.raises(InfeasibleBudgetError, match="5") as info:
        FederatedTrainer(cfg(tmp_path, budgets=budgets))
    assert "1" in str(info.value) and "KiB" in str(info.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fedkernels.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_minus_9_and_resume_matches_uninterrupted(tmp_path):
    c = cfg(tmp_path, "killed", rounds=4)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(c.to_dict()))
    # the CLI through a test-only wrapper that sleeps after round 2's checkpoint
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("pause_cli.py")), "2", "train", "--config",
                             str(cfg_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = tmp_path / "killed" / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "round-00002"):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == "round-00002"
    resumed = _cli(["--resume", str(tmp_path / "killed")])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()

    ref = FederatedTrainer(FederatedConfig(**{**c.to_dict(), "output_dir": str(tmp_path / "ref")}))
    ref_summary = ref.run()
    got = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    for h in got:
        h.pop("timings"), h.pop("wall_s")
        for cl in h["clients"]:
            cl.pop("wall_s", None)
    assert_same_history(got, ref_summary.history)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bbc_minilm_reduced_demo_learns_and_fedpilot_beats_bucket_baseline(tmp_path):
    """MiniLM-L6 on BBC News at reduced size: clearly above chance (0.2), fedpilot >= fedit-min."""
    # Measured with this setting (seed 0, CPU): fedpilot 0.914, fedit-min 0.819 after 4 rounds.
    common = dict(model="minilm-l6", max_examples=700, num_clients=10, fraction=0.5, rounds=4, local_steps=8,
                  batch_size=8, seq_len=64, max_eval=120, lr=5e-3, partition="dirichlet:0.5")
    accs = {}
    for strategy in ("fedpilot", "fedit-min"):
        c = FederatedConfig(**common, strategy=strategy, output_dir=str(tmp_path / strategy))
        accs[strategy] = FederatedTrainer(c).run().final_accuracy
    assert accs["fedpilot"] >= 0.75, accs
    assert accs["fedpilot"] >= accs["fedit-min"], accs


def test_hetlora_tail_penalty_shrinks_the_tails_the_server_sees(tmp_path):
    """HetLoRA's client-side term (lambda * ||B tail A tail||_F) is in the local loss: same seed, same plans,
    the tail norms the server records are smaller with it than without."""

    def tails(name, **opts):
        trainer = FederatedTrainer(cfg(tmp_path, name, strategy="hetlora", rounds=2, local_steps=4,
                                       aggregation_options={"prune_gamma": 0.5, **opts}))
        trainer.run()
        recorded = trainer.global_state.extra["tail_norms"]
        return {(c, m): v for c, mods in recorded.items() for m, v in mods.items()}

    plain = tails("plain")
    penalised = tails("penalised", tail_penalty=5.0)
    assert plain.keys() == penalised.keys() and plain
    assert sum(penalised.values()) < 0.5 * sum(plain.values())


@pytest.mark.parametrize("poison", ["nan", "shape"])
def test_a_bad_classification_head_rejects_the_client(tmp_path, poison):
    """Issue 12.5: updates were validated on A and B only, so a NaN head became the global head."""

    def hook(cid, round_idx, res):
        if cid == 0:
            k = next(iter(res.head))
            t = res.head[k].clone()
            if poison == "nan":
                t.view(-1)[0] = float("nan")
            else:
                t = t[..., :-1].clone()
            res.head[k] = t
        return res

    trainer = FederatedTrainer(cfg(tmp_path, fraction=1.0, rounds=1), fault_hook=hook)
    rec = trainer.run().history[0]
    reasons = {f["client"]: f["reason"] for f in rec["failures"]}
    assert set(reasons) == {0} and "head" in reasons[0]
    assert ("non-finite" if poison == "nan" else "shape") in reasons[0]
    assert not rec["skipped"] and rec["succeeded"] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(v).all() for v in trainer.global_head.values())


def test_rounds_argument_leaves_the_config_alone(tmp_path):
    c = cfg(tmp_path, rounds=2)
    trainer = FederatedTrainer(c)
    summary = trainer.run(rounds=1)
    assert summary.rounds == 1 and trainer.cfg.rounds == 1 and c.rounds == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rounds"] == 1
