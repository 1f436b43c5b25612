"""`fedkernels.federated.compare`: runs per strategy x partition x seed, their summary table, CSV and plot."""

import csv
import json
import statistics
import struct
from pathlib import Path

import pytest

from fedkernels.assets import load_bbc_news
from fedkernels.federated import FederatedConfig
from fedkernels.federated.compare import compare, plot_runs, summarise, write_table_csv
from fedkernels.federated.trainer import RunSummary

TINY = dict(model="tiny-bert", max_examples=60, num_clients=3, fraction=1.0, rounds=1, local_steps=1, batch_size=4,
            seq_len=16, lora_rank=2, lora_alpha=4.0, max_eval=12)


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def fake_run(acc: float, bytes_up: list[int], rounds: int = 2, allocation=None) -> RunSummary:
    history = [{"round": i + 1, "accuracy": acc * (i + 1) / rounds, "loss": 1.0, "bytes_up": b}
               for i, b in enumerate(bytes_up)]
    return RunSummary(rounds, acc, 1.0, history, Path("."), None, allocation)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_summarise_is_mean_and_population_std_per_strategy_and_partition():
    runs = {("a", "iid", 0): fake_run(0.5, [2**20, 2**20]), ("a", "iid", 1): fake_run(0.7, [2**21, 2**21]),
            ("b", "iid", 0): fake_run(0.9, [2**20, 0]), ("a", "dirichlet:0.5", 0): fake_run(0.1, [0, 0])}
    rows = summarise(runs)
    assert [(r["strategy"], r["partition"], r["seeds"]) for r in rows] == [
        ("a", "dirichlet:0.5", 1), ("a", "iid", 2), ("b", "iid", 1)]
    a_iid = rows[1]
    assert a_iid["accuracy_mean"] == pytest.approx(0.6)
    assert a_iid["accuracy_std"] == pytest.approx(statistics.pstdev([0.5, 0.7]))  # 0.1
    assert a_iid["mb_up_mean"] == pytest.approx((2 + 4) / 2)  # MiB summed over rounds, averaged over seeds
    assert rows[2]["accuracy_std"] == 0.0 and rows[2]["mb_up_mean"] == pytest.approx(1.0)


def test_table_csv_round_trips_the_rows(tmp_path):
    rows = summarise({("a", "iid", 0): fake_run(0.25, [3 * 2**20]), ("b", "iid", 0): fake_run(0.75, [2**20])})
    write_table_csv(rows, tmp_path / "deep" / "t.csv")
    back = list(csv.DictReader((tmp_path / "deep" / "t.csv").open()))
    assert [r["strategy"] for r in back] == ["a", "b"]
    assert [float(r["accuracy_mean"]) for r in back] == [0.25, 0.75]
    assert [float(r["mb_up_mean"]) for r in back] == [3.0, 1.0]


def test_plot_has_one_panel_per_strategy(tmp_path):
    alloc = [[0.0, 1.0], [1.0, 1.0]]
    one = {("a", "iid", 0): fake_run(0.5, [1, 1], allocation=alloc)}
    three = {**one, ("b", "iid", 0): fake_run(0.6, [1, 1], allocation=alloc),
             ("c", "iid", 0): fake_run(0.7, [1, 1], allocation=alloc)}
    w1, h1 = png_size(plot_runs(one, tmp_path / "one.png"))
    w3, h3 = png_size(plot_runs(three, tmp_path / "three.png"))
    assert w3 > 1.5 * w1  # the figure is 4.5 in wide per panel: accuracy + one heat map per strategy
    assert abs(h3 - h1) < 0.2 * h1


def test_compare_runs_every_combination_into_its_own_folder(tmp_path, bbc):
    base = FederatedConfig(**TINY, output_dir=str(tmp_path))
    runs = compare(base, ["fedit-full", "fedit-min"], ["iid"], [0, 1], dataset=bbc)
    assert sorted(runs) == [("fedit-full", "iid", 0), ("fedit-full", "iid", 1), ("fedit-min", "iid", 0),
                            ("fedit-min", "iid", 1)]
    for (strategy, part, seed), run in runs.items():
        folder = tmp_path / f"{strategy}__{part}__seed{seed}"
        assert run.output_dir == folder
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["strategy"], saved["partition"], saved["seed"]) == (strategy, part, seed)
        assert [json.loads(x)["round"] for x in (folder / "metrics.jsonl").read_text().splitlines()] == [1]
        # clients x layers (tiny-bert: 4 layers), shares in [0, 1]
        assert len(run.allocation) == 3 and all(len(row) == 4 for row in run.allocation)
    # fedit-full trains every module at full rank; fedit-min trains the fewest modules (the cheapest plan)
    assert all(v == 1.0 for row in runs[("fedit-full", "iid", 0)].allocation for v in row)
    assert all(sum(row) < 4 for row in runs[("fedit-min", "iid", 0)].allocation)
    # another seed is another run (different initialisation and sampling), not a copy
    h0, h1 = runs[("fedit-full", "iid", 0)].history, runs[("fedit-full", "iid", 1)].history
    assert (h0[0]["loss"], h0[0]["accuracy"]) != (h1[0]["loss"], h1[0]["accuracy"])


def test_a_metric_logged_every_few_rounds_is_drawn_at_its_rounds():
    """ROUGE-L logged only on eval_every rounds (2, 4) must sit at x = 2, 4, not at 1, 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedkernels.federated.compare import _draw_curves

    fig, ax = plt.subplots()
    _draw_curves(ax, {"fedpilot": [[0.2, 0.4]]}, ["fedpilot"], "t", metric="rougeL", rounds=[2, 4])
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [20.0, 40.0]
    fig2, ax2 = plt.subplots()
    _draw_curves(ax2, {"fedpilot": [[0.5, 0.6, 0.7]]}, ["fedpilot"], "t")  # every round logged: 1..n
    assert list(ax2.get_lines()[0].get_xdata()) == [1, 2, 3]
    plt.close(fig)
    plt.close(fig2)
