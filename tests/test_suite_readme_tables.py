"""bench/suite_readme_tables.py: the README's suite tables from the suite's summary CSV."""

from __future__ import annotations

from bench.suite_readme_tables import summary_table


def _row(entry, part, seeds, mean, std, best, diff="", lo="", hi=""):
    return {"entry": entry, "partition": part, "seeds": str(seeds), "accuracy_mean": str(mean),
            "accuracy_std": str(std), "mib_up_mean": "1.0", "best_seed_method": best, "diff_mean": str(diff),
            "diff_lo": str(lo), "diff_hi": str(hi)}


def test_summary_table_puts_ours_first_marks_the_best_and_prints_no_nan_for_one_seed():
    rows = [
        _row("fedit-min", "iid", 3, 0.9, 0.01, "fedit-min"),
        _row("fk-adaptive", "iid", 3, 0.95, 0.02, "fedit-min", 0.05, 0.01, 0.09),
        _row("fedhello-fim", "iid", 1, 0.8, "nan", "fedit-min", -0.1, "nan", "nan"),
    ]
    lines = summary_table(rows).splitlines()
    assert lines[2] == "| fk-adaptive (ours) | 95.0 ± 2.0<br>+5.0 [+1.0, +9.0] |"
    assert lines[3] == "| fedit-min | **90.0 ± 1.0** (best seed method) |"
    assert lines[4] == "| fedhello-fim | 80.0 (1 seed)<br>-10.0 [n/a, n/a] |"
    assert "nan" not in "\n".join(lines)
