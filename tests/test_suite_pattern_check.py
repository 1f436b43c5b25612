"""bench/suite_pattern_check.py: pattern runs against the preset's run of the same partition and seed."""

from __future__ import annotations

import json

import pytest

from bench.suite_pattern_check import check_patterns


def _run(root, entry, part, seed, accs, modules=(6, 12), finished=True):
    d = root / entry / part / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"round": r, "accuracy": a, "sampled": [1, 2],
             "clients": [{"client": c, "modules": m, "ranks": [8], "planned_bytes": 100 * m, "status": "trained"}
                         for c, m in zip((1, 2), modules, strict=True)]}
            for r, a in accs.items()]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    if finished:
        (d / "summary.json").write_text("{}")


def test_same_plans_and_accuracy_differences_are_reported_apart(tmp_path):
    _run(tmp_path, "fedhello", "iid", 0, {15: 0.5, 16: 0.8, 17: 0.9})
    _run(tmp_path, "fedhello-gd-triangle", "iid", 0, {15: 0.5, 16: 0.8, 17: 0.9})  # identical
    _run(tmp_path, "fedhello-fim", "iid", 0, {15: 0.6, 16: 0.7, 17: 0.9})  # same plans, other accuracy
    _run(tmp_path, "fedhello-rgd-uniform", "iid", 0, {15: 0.5, 16: 0.8, 17: 0.9}, modules=(2, 12))
    _run(tmp_path, "fedhello-rgd-triangle", "iid", 0, {15: 0.1}, finished=False)  # unfinished: skipped
    got = {c.run: c for c in check_patterns(tmp_path, tail=2)}  # score: the last 2 evaluated rounds
    assert sorted(got) == ["fedhello-fim/iid/seed0", "fedhello-gd-triangle/iid/seed0", "fedhello-rgd-uniform/iid/seed0"]
    same = got["fedhello-gd-triangle/iid/seed0"]
    assert same.same_plans and same.same_accuracy and same.score_diff == 0 and same.max_round_diff == 0
    fim = got["fedhello-fim/iid/seed0"]
    assert fim.same_plans and not fim.same_accuracy
    assert fim.score_diff == pytest.approx(-5.0)  # rounds 16-17: (-0.1 + 0) / 2, round 15 left out
    assert fim.max_round_diff == pytest.approx(10.0)
    assert not got["fedhello-rgd-uniform/iid/seed0"].same_plans
