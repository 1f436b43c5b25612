"""Print the README's two paper-suite tables from the suite's CSVs (``docs/suite-paper-summary.csv`` and
``docs/suite-paper-orderings.csv``, written by ``fedkernels compare --suite paper``).

The README keeps its prose by hand; the tables come from here so a number in them is one the suite wrote:

    python bench/suite_readme_tables.py [--docs docs] > /tmp/tables.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1", "pathological:1")


def _pts(x: str) -> float:
    return 100 * float(x)


def summary_table(rows: list[dict], ours: str = "fk-adaptive") -> str:
    """Strategy rows, partition columns: mean ± std and below it the paired difference to the best seed method."""
    by = {(r["entry"], r["partition"]): r for r in rows}
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    # ours first, then the others by their mean over the partitions they ran (a reader looks for the top)
    entries.sort(key=lambda e: (e != ours, -sum(_pts(by[e, p]["accuracy_mean"]) for p in PARTITIONS if (e, p) in by)))
    out = ["| strategy | " + " | ".join(PARTITIONS) + " |", "|---|" + "---:|" * len(PARTITIONS)]
    for e in entries:
        cells = []
        for p in PARTITIONS:
            r = by.get((e, p))
            if r is None:
                cells.append("not run")
                continue
            head = f"{_pts(r['accuracy_mean']):.1f} ± {_pts(r['accuracy_std'] or 0):.1f}"
            n = int(r["seeds"])
            if n < 3:
                head += f" ({n} seed{'s' if n > 1 else ''})"
            if r["best_seed_method"] == e:
                cells.append(f"**{head}** (best seed method)")
            elif r["diff_mean"]:
                lo = f"{_pts(r['diff_lo']):+.1f}" if r["diff_lo"] else "n/a"
                hi = f"{_pts(r['diff_hi']):+.1f}" if r["diff_hi"] else "n/a"
                cells.append(f"{head}<br>{_pts(r['diff_mean']):+.1f} [{lo}, {hi}]")
            else:
                cells.append(head)
        label = f"{e} (ours)" if e == ours else e
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def orderings_table(rows: list[dict]) -> str:
    by = {(r["claim"], r["partition"]): r for r in rows}
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    out = ["| claim | " + " | ".join(PARTITIONS) + " |", "|---|" + "---:|" * len(PARTITIONS)]
    for c in claims:
        cells = []
        for p in PARTITIONS:
            r = by.get((c, p))
            if r is None or not r["diff_mean"]:
                cells.append("")
                continue
            lo, hi = (f"{_pts(r[k]):+.1f}" if r[k] else "n/a" for k in ("diff_lo", "diff_hi"))
            cells.append(f"{_pts(r['diff_mean']):+.1f} [{lo}, {hi}] {r['verdict']}")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    args = ap.parse_args()
    with open(args.docs / "suite-paper-summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    with open(args.docs / "suite-paper-orderings.csv", newline="") as f:
        orderings = list(csv.DictReader(f))
    print(summary_table(summary), "", orderings_table(orderings), sep="\n")


if __name__ == "__main__":
    main()
