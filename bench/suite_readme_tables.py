"""Print the README's suite tables from the suite's CSVs (``docs/suite-<name>-summary.csv`` and
``docs/suite-<name>-orderings.csv``, written by ``fedkernels compare --suite <name>``).

The README keeps its prose by hand; the tables come from here so a number in them is one the suite wrote:

    python bench/suite_readme_tables.py [--docs docs] [--suite paper|instruct] > /tmp/tables.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def _pts(x: str) -> float:
    return 100 * float(x)


def _bound(x: str) -> str:
    """One end of a paired interval in points, ``n/a`` where one seed gave none (empty or nan in the CSV)."""
    return f"{_pts(x):+.1f}" if x and x != "nan" else "n/a"


def _metric(rows: list[dict]) -> str:
    """The scored metric: the ``<metric>_mean`` column (``accuracy`` for the paper suite, ``rougeL`` for instruct)."""
    return next(k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and k not in ("mib_up_mean", "diff_mean"))


def summary_table(rows: list[dict], ours: str = "fk-adaptive") -> str:
    """Strategy rows, partition columns: mean ± std and below it the paired difference to the best seed method."""
    parts = tuple(dict.fromkeys(r["partition"] for r in rows))  # the protocol's order
    metric = _metric(rows)
    by = {(r["entry"], r["partition"]): r for r in rows}
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    # ours first, then the others by their mean over the partitions they ran (a reader looks for the top)
    entries.sort(key=lambda e: (e != ours, -sum(_pts(by[e, p][f"{metric}_mean"]) for p in parts if (e, p) in by)))
    out = ["| strategy | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    for e in entries:
        cells = []
        for p in parts:
            r = by.get((e, p))
            if r is None:
                cells.append("not run")
                continue
            std = r[f"{metric}_std"]
            n = int(r["seeds"])
            head = f"{_pts(r[f'{metric}_mean']):.1f}"
            if n > 1 and std and std != "nan":  # one seed has no spread to print
                head += f" ± {_pts(std):.1f}"
            if n < 3:
                head += f" ({n} seed{'s' if n > 1 else ''})"
            if r["best_seed_method"] == e:
                cells.append(f"**{head}** (best seed method)")
            elif r["diff_mean"]:
                cells.append(f"{head}<br>{_pts(r['diff_mean']):+.1f} [{_bound(r['diff_lo'])}, {_bound(r['diff_hi'])}]")
            else:
                cells.append(head)
        label = f"{e} (ours)" if e == ours else e
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def orderings_table(rows: list[dict], parts: tuple[str, ...]) -> str:
    by = {(r["claim"], r["partition"]): r for r in rows}
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    out = ["| claim | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    for c in claims:
        cells = []
        for p in parts:
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
    ap.add_argument("--suite", default="paper")
    args = ap.parse_args()
    with open(args.docs / f"suite-{args.suite}-summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    with open(args.docs / f"suite-{args.suite}-orderings.csv", newline="") as f:
        orderings = list(csv.DictReader(f))
    parts = tuple(dict.fromkeys(r["partition"] for r in summary))
    print(summary_table(summary), "", orderings_table(orderings, parts), sep="\n")


if __name__ == "__main__":
    main()
