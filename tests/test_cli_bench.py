"""`fedkernels bench`: an unknown suite is refused with the list of real ones (no benchmark is run)."""

from typer.testing import CliRunner

from fedkernels.cli import app


def test_bench_unknown_suite_lists_the_available_ones():
    res = CliRunner().invoke(app, ["bench", "kernels"])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "no benchmark suite 'kernels'" in out
    for name in ("aggregation", "lora_linear", "multi_lora", "solvers"):
        assert name in out
