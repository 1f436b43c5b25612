"""Compare every finished Fed-HeLLo pattern run of a suite with the ``fedhello`` preset's run of the same partition
and seed (the README's pattern bullet): same sampled clients and per-client plans (modules, ranks, planned bytes,
status) in every round, and the accuracy at every evaluated round.

    python bench/suite_pattern_check.py [--root docs/suite-runs/paper] [--preset fedhello]

Why plans and accuracy are reported apart: the plans are integers decided by the memory model, while the
accuracy is the end of 20 rounds of float training whose rounding depends on the CPU's kernels. Two runs of one
config on two machines (an earlier session's and session 7's) matched in every plan and differed by up to 16
points at a single round.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from fedkernels.federated.suite import PAPER, tail_score


@dataclass(frozen=True)
class PatternCheck:
    run: str  # "<entry folder>/<partition>/seed<k>"
    same_plans: bool  # sampled clients and every client's modules, ranks, planned bytes, status in every round
    same_accuracy: bool  # bit-identical accuracy at every evaluated round
    score_diff: float  # pattern - preset, accuracy points, of the suite's score (`tail_score`)
    max_round_diff: float  # largest |pattern - preset| at one evaluated round, points


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _plans(history: list[dict]) -> list:
    return [(h["sampled"], [(c["client"], c["modules"], c["ranks"], c["planned_bytes"], c["status"])
                            for c in h["clients"]]) for h in history]


def _accuracy(history: list[dict]) -> dict[int, float]:
    return {h["round"]: float(h["accuracy"]) for h in history if h.get("accuracy") is not None}


def check_patterns(root: Path, preset: str = "fedhello", tail: int = PAPER.tail_rounds) -> list[PatternCheck]:
    """One `PatternCheck` per finished run (``summary.json`` present) under ``root/<preset>-*/`` whose preset twin
    ``root/<preset>/<partition>/seed<k>`` has finished too."""
    out = []
    for entry in sorted(root.glob(f"{preset}-*")):
        for run in sorted(entry.glob("*/seed*")):
            twin = root / preset / run.relative_to(entry)
            if not ((run / "summary.json").is_file() and (twin / "summary.json").is_file()):
                continue
            a, b = _rounds(run), _rounds(twin)
            acc_a, acc_b = _accuracy(a), _accuracy(b)
            if acc_a.keys() != acc_b.keys():
                raise ValueError(f"{run}: evaluated rounds {sorted(acc_a)} differ from {twin}'s {sorted(acc_b)}")
            diff = tail_score(a, tail) - tail_score(b, tail)
            out.append(PatternCheck(run=str(run.relative_to(root)), same_plans=_plans(a) == _plans(b),
                                    same_accuracy=acc_a == acc_b, score_diff=100 * diff,
                                    max_round_diff=100 * max((abs(acc_a[r] - acc_b[r]) for r in acc_a), default=0.0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("docs/suite-runs/paper"))
    ap.add_argument("--preset", default="fedhello")
    args = ap.parse_args()
    checks = check_patterns(args.root, args.preset)
    for c in checks:
        if not (c.same_plans and c.same_accuracy):
            print(f"{c.run}: plans {'same' if c.same_plans else 'DIFFER'}, score {c.score_diff:+.2f} points, "
                  f"largest round difference {c.max_round_diff:.2f}")
    n_acc = sum(c.same_accuracy for c in checks)
    diffs = [c.score_diff for c in checks if not c.same_accuracy]
    print(f"{len(checks)} pattern runs: {sum(c.same_plans for c in checks)} with the preset's plans, {n_acc} with its "
          f"accuracy bit for bit" + (f"; the others' score differences {min(diffs):+.2f} to {max(diffs):+.2f} points"
                                     if diffs else ""))


if __name__ == "__main__":
    main()
