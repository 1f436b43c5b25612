"""The benchmark suite (fedkernels.federated.suite): pairing, statistics, reports, skip-finished and resume."""

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from fedkernels.federated import FederatedTrainer
from fedkernels.federated.suite import (
    _T975,
    PAPER,
    QUICK,
    STATUS,
    Claim,
    RunResult,
    _launch,
    claim_rows,
    collect,
    markdown,
    paired_interval,
    run_suite,
    summary_rows,
    worker,
    write_reports,
)


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_paper_protocol_is_the_documented_one():
    assert PAPER.base["model"] == "minilm-l6" and PAPER.base["num_clients"] == 20
    assert len(PAPER.base["budget_tiers"]) == 3
    assert PAPER.partitions == ("iid", "dirichlet:0.5", "dirichlet:0.1", "pathological:1")
    assert PAPER.seeds == (0, 1, 2) and min(PAPER.tuning_seeds) >= 100
    labels = [e.label for e in PAPER.entries]
    assert len(labels) == len(set(labels))
    from fedkernels.federated.config import STRATEGIES

    assert {e.strategy for e in PAPER.entries if e.allocation is None} == set(STRATEGIES)
    assert {"fedhello-gd:triangle", "fedhello-rgd:uniform", "fedhello-fim"} <= set(labels)
    assert [e.label for e in PAPER.entries if e.reference] == ["fedit-full"]
    specs = PAPER.runs("/nonexistent")
    assert len(specs) == len(labels) * 4 * 3 and len({s.folder for s in specs}) == len(specs)


def test_every_protocol_builds_valid_paired_configs_and_tunes_on_tuning_seeds_only():
    from fedkernels.federated.suite import PROTOCOLS

    for name, proto in PROTOCOLS.items():
        specs = proto.runs("/nonexistent")  # FederatedConfig validates every field of every run
        assert len({s.folder for s in specs}) == len(specs) == len(proto.entries) * len(proto.partitions) * len(
            proto.seeds), name
        if "tuning" in name or "pilot" in name:
            assert set(proto.seeds) <= set(proto.tuning_seeds) and min(proto.seeds) >= 100, name
    tuning = PROTOCOLS["instruct-tuning"]
    assert tuning.metric == "rougeL" and tuning.base == PROTOCOLS["instruct"].base
    opts = {e.label: e.options for e in tuning.entries}
    assert opts["fk-adaptive-cover0-slr1"] == {"allocation_options": {"min_coverage": 0.0},
                                               "aggregation_options": {"server_lr": 1.0}}


def test_runs_of_different_strategies_are_paired(tmp_path):
    """Same seed: identical model init, test split, partitions and sampled clients; only the strategy differs."""
    specs = {(s.entry.label, s.partition, s.seed): s for s in QUICK.restrict(seeds=[0, 1]).runs(tmp_path)}
    a, b = specs[("fedpilot", "dirichlet:0.5", 0)].config, specs[("fedra", "dirichlet:0.5", 0)].config
    da, db = a.to_dict(), b.to_dict()
    assert {k for k in da if da[k] != db[k]} == {"strategy", "output_dir"}
    ta, tb = FederatedTrainer(a), FederatedTrainer(b)
    assert (ta.test_idx == tb.test_idx).all()
    assert all((x == y).all() for x, y in zip(ta.client_indices, tb.client_indices, strict=True))
    for m, (A, B) in ta.global_state.factors.items():
        assert torch.equal(A, tb.global_state.factors[m][0]) and torch.equal(B, tb.global_state.factors[m][1])
    assert [ta.sample_clients(r) for r in (1, 2, 3)] == [tb.sample_clients(r) for r in (1, 2, 3)]
    other = FederatedTrainer(specs[("fedpilot", "dirichlet:0.5", 1)].config)
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(ta.client_indices, other.client_indices,
                                                                    strict=True))


def test_paired_interval_is_the_t_interval():
    mean, lo, hi = paired_interval([0.01, 0.03, 0.02])
    half = 4.303 * 0.01 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert mean == pytest.approx(0.02) and lo == pytest.approx(0.02 - half, abs=1e-5)
    assert hi == pytest.approx(0.02 + half, abs=1e-5)
    m1, lo1, hi1 = paired_interval([0.05])
    assert m1 == 0.05 and lo1 != lo1 and hi1 != hi1  # NaN: no interval from one seed
    stats = pytest.importorskip("scipy.stats")
    for df, q in enumerate(_T975, start=1):
        assert q == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df


def wait_for(path, timeout=180.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def test_quick_suite_resumes_a_killed_run_skips_finished_ones_and_reports(tmp_path):
    root = tmp_path / "runs"
    specs = QUICK.runs(root)
    assert len(specs) == 4
    killed = specs[0]
    # a worker that holds still after round 1's checkpoint, then dies by SIGKILL (no clean-up at all)
    pause = [sys.executable, str(Path(__file__).with_name("pause_suite_worker.py")), "1"]
    proc, fh = _launch(killed, {**os.environ, "OMP_NUM_THREADS": "1"}, entry=pause)
    try:
        wait_for(killed.folder / "checkpoints" / "LATEST")
        time.sleep(0.5)
        assert worker(killed.folder) == 3  # the folder is locked by the live worker: no second writer
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        fh.close()
    assert killed.state() == "resume" and not (killed.folder / "summary.json").exists()

    lines = []
    outcome = run_suite(QUICK, root, jobs=2, echo=lines.append)
    assert set(outcome.values()) == {"done"}, (outcome, [(s.folder / "worker.log").read_text() for s in specs])
    status = json.loads((killed.folder / STATUS).read_text())
    assert status["processes"][-1]["start_round"] == 1  # continued from the checkpoint, not from scratch
    assert [json.loads(x)["round"] for x in (killed.folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert all(json.loads((s.folder / STATUS).read_text())["processes"][-1]["start_round"] == 0 for s in specs[1:])

    before = {s.folder: (s.folder / "suite-processes.jsonl").read_text() for s in specs}
    procs = [json.loads(x) for text in before.values() for x in text.splitlines()]
    assert all(p["exit"] == 0 and "torch " in p["machine"] for p in procs)  # which machine ran it: rounding differs
    again = run_suite(QUICK, root, jobs=2, echo=lines.append)
    assert set(again.values()) == {"skipped"}
    assert before == {s.folder: (s.folder / "suite-processes.jsonl").read_text() for s in specs}  # nothing launched

    out = tmp_path / "docs"
    paths = write_reports(QUICK, root, out, command="fedkernels compare --suite quick")
    rows = paths["csv"].read_text().splitlines()
    assert len(rows) == 1 + 4 * 2 and rows[0].startswith("entry,strategy,allocation,partition,seed,round")
    md = paths["md"].read_text()
    assert "PARTIAL" not in md
    for needle in ("| fedpilot |", "| fedra |", "iid", "dirichlet:0.5", "best seed method", "Where the time goes"):
        assert needle in md, needle
    for kind in ("curves", "allocation"):
        w, h = png_size(paths[kind])
        assert 300 < w < 2000 and 200 < h < 2000, (kind, w, h)
    results = collect(QUICK, root)
    assert all(r.allocation and len(r.allocation) == QUICK.base["num_clients"] for r in results)
    best = {r["partition"]: r["best_seed_method"] for r in summary_rows(QUICK, results)}
    assert set(best) == {"iid", "dirichlet:0.5"} and set(best.values()) <= {"fedpilot", "fedra"}

    (specs[-1].folder / "summary.json").unlink()  # an unfinished run: the report must say it is partial
    assert "PARTIAL: 3 of 4 runs finished" in write_reports(QUICK, root, out)["md"].read_text()

    from typer.testing import CliRunner

    from fedkernels.cli import app

    res = CliRunner().invoke(app, ["compare", "--suite", "quick", "--root", str(root), "--out", str(tmp_path / "cli"),
                                   "--report-only"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "suite-quick.md").is_file()
    bad = CliRunner().invoke(app, ["compare", "--suite", "nope", "--report-only"])
    assert bad.exit_code == 2 and "no such suite" in bad.output


def test_compare_plot_stays_readable_with_every_strategy(tmp_path):
    """The old one-row layout made an 8-strategy PNG 3146 px wide; the grid keeps it under 1800 px."""
    from fedkernels.federated.compare import plot_runs
    from fedkernels.federated.config import STRATEGIES
    from fedkernels.federated.trainer import RunSummary

    runs = {}
    for i, s in enumerate(STRATEGIES):
        history = [{"accuracy": 0.2 + 0.1 * r + 0.01 * i} for r in range(4)]
        alloc = [[float((c + layer + i) % 2) for layer in range(6)] for c in range(20)]
        runs[(s, "iid", 0)] = RunSummary(4, history[-1]["accuracy"], 0.0, history, tmp_path, None, alloc)
    w, h = png_size(plot_runs(runs, tmp_path / "compare.png"))
    assert len(STRATEGIES) >= 8 and w < 1800 and h < 1800, (w, h)


def test_claims_report_the_paired_difference_and_a_verdict(tmp_path):
    # three synthetic seeds per entry: scores are the mean of the protocol's last tail_rounds evaluated rounds
    import dataclasses

    proto = dataclasses.replace(PAPER.restrict(entries=["fedpilot", "fedra", "hetlora", "fedit-min"],
                                               partitions=["iid", "dirichlet:0.5"]),
                                claims=(Claim("fedpilot", "fedra", "A"), Claim("fedra", "hetlora", "B"),
                                        Claim("hetlora", "fedit-min", "C"), Claim("flora", "fedra", "absent")))
    score = {  # (entry, partition) -> per-seed scores
        ("fedpilot", "iid"): (0.90, 0.92, 0.91), ("fedra", "iid"): (0.80, 0.81, 0.79),
        ("hetlora", "iid"): (0.85, 0.70, 0.85), ("fedit-min", "iid"): (0.96, 0.80, 0.94),
        ("fedpilot", "dirichlet:0.5"): (0.5, 0.6, 0.7),
    }
    results = []
    for spec in proto.runs(tmp_path):
        accs = score.get((spec.entry.label, spec.partition))
        if accs is None or (spec.partition == "dirichlet:0.5" and spec.seed == 2):
            continue
        a = accs[spec.seed]
        # earlier rounds off the tail must not count: round 1 scores 0
        hist = [{"round": k, "accuracy": 0.0 if k == 1 else a, "bytes_up": 0, "bytes_down": 0}
                for k in (1, *range(16, 21))]
        results.append(RunResult(spec, hist, finished=True))
    rows = {(r["claim"], r["partition"]): r for r in claim_rows(proto, results)}
    assert set(rows) == {("fedpilot > fedra", "iid"), ("fedra > hetlora", "iid"), ("hetlora > fedit-min", "iid")}
    r = rows[("fedpilot > fedra", "iid")]
    assert r["diff_mean"] == pytest.approx(0.11) and r["diff_lo"] > 0 and r["verdict"] == "holds"
    assert rows[("hetlora > fedit-min", "iid")]["verdict"] == "reversed"  # -0.11, -0.10, -0.09
    assert rows[("fedra > hetlora", "iid")]["verdict"] == "not resolved"  # -0.05, +0.11, -0.06
    md = markdown(proto, results, summary_rows(proto, results))
    assert "## The papers' orderings" in md
    assert "| fedpilot > fedra | A | +11.0 [" in md and "] holds |" in md
    assert "absent" not in md  # a claim about an entry the protocol does not run is left out


def test_a_run_recorded_under_another_config_is_stale_and_started_over(tmp_path):
    import dataclasses

    from fedkernels.io import atomic_write_json

    proto = QUICK.restrict(entries=["fedpilot"], partitions=["iid"])
    spec, = proto.runs(tmp_path)
    spec.folder.mkdir(parents=True)
    # a finished record of an older protocol: another lr, and lacking a field added since (not compared)
    old = {k: v for k, v in spec.config.to_dict().items() if k != "eval_last"} | {"lr": 1e-3}
    atomic_write_json(spec.folder / "suite-config.json", old)
    for name, body in (("summary.json", "{}"), (STATUS, "{}"), ("metrics.jsonl", '{"round": 1, "accuracy": 0.9}\n')):
        (spec.folder / name).write_text(body)
    assert spec.config_drift() == {"lr": (1e-3, spec.config.lr)} and spec.state() == "stale"
    assert collect(proto, tmp_path) == []  # never reported beside the current protocol's runs
    same = dataclasses.replace(spec, config=spec.config.with_overrides([f"lr={1e-3}"]))
    assert same.config_drift() == {} and same.state() == "done"

    lines = []
    outcome = run_suite(proto, tmp_path, jobs=1, echo=lines.append)
    assert outcome == {spec.key: "done"}, [(spec.folder / "worker.log").read_text()]
    assert any("stale fedpilot/iid/0" in x and "lr 0.001 -> 0.005" in x for x in lines), lines
    assert any(x.startswith("  done   fedpilot/iid/0") and "[1 of 1 this session, ~0 min left]" in x for x in lines)
    assert spec.state() == "done"
    assert json.loads((spec.folder / "suite-config.json").read_text())["lr"] == spec.config.lr
    assert len(collect(proto, tmp_path)[0].history) == proto.base["rounds"]


def test_instruct_protocol_scores_its_metric_not_accuracy(tmp_path):
    """The instruct suite scores macro ROUGE-L (the causal-LM task's headline metric) of its generation rounds;
    rounds with only the held-out loss do not count, and the reports name the metric."""
    from fedkernels.federated.config import STRATEGIES
    from fedkernels.federated.suite import INSTRUCT, round_rows

    assert INSTRUCT.metric == "rougeL" and INSTRUCT.base["task"] == "causal-lm" and "task" in INSTRUCT.partitions
    assert {e.strategy for e in INSTRUCT.entries} == set(STRATEGIES) | {"fk-adaptive"}
    assert {"fk-adaptive-cover0-slr0.5", "fk-adaptive-slr0.5"} <= {e.label for e in INSTRUCT.entries}
    proto = INSTRUCT.restrict(entries=["fedpilot", "fedit-min"], partitions=["task"])
    cfg = proto.runs(tmp_path)[0].config
    generation_rounds = [k for k in range(1, cfg.rounds + 1) if cfg.evaluates_at(k)]
    assert generation_rounds[-proto.tail_rounds:] == list(range(cfg.rounds - proto.tail_rounds + 1, cfg.rounds + 1))
    results = []
    for spec in proto.runs(tmp_path):
        top = 0.5 if spec.entry.label == "fedpilot" else 0.3
        hist = [{"round": k, "loss": 2.0, "bytes_up": 0, "bytes_down": 0, "sampled": [0], "succeeded": [0],
                 "skipped": False, **({"rougeL": top + 0.01 * spec.seed} if k in generation_rounds[1:] else
                    {"rougeL": 0.0} if k in generation_rounds else {})}
                for k in range(1, cfg.rounds + 1)]
        results.append(RunResult(spec, hist, finished=True))
    rows = {r["entry"]: r for r in summary_rows(proto, results)}
    assert rows["fedpilot"]["rougeL_mean"] == pytest.approx(0.51) and "accuracy_mean" not in rows["fedpilot"]
    assert rows["fedit-min"]["best_seed_method"] == "fedpilot"
    assert rows["fedit-min"]["diff_mean"] == pytest.approx(-0.2)
    md = markdown(proto, results, list(rows.values()))
    assert "held-out macro ROUGE-L, mean of the last 3 rounds" in md and "| fedpilot | 51.0 ± 1.0 |" in md
    csv_rows = round_rows(results, proto.metric)
    assert "accuracy" not in csv_rows[0]
    assert [r["rougeL"] for r in csv_rows[: cfg.rounds]] == [h.get("rougeL", "") for h in results[0].history]
