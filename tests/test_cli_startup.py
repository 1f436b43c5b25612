"""`fedkernels --help` and `fedkernels plan --help` load neither torch nor transformers (issue 11 item 7).

Each case runs the CLI in a fresh interpreter and reports, at exit, which heavy modules it imported: the
import set is what decides the start-up time (torch alone takes 1-10 s to import on the 2-core CI machine,
the CLI without it about 0.3 s). The time is printed for the log, not asserted (performance is measured in
bench/, never asserted in unit tests).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "peft", "numpy", "matplotlib")

# Runs the CLI in-process and prints the heavy modules loaded and the fedkernels modules imported at exit.
PROBE = """
import atexit, json, sys
def _report():
    fk = sorted(m for m in sys.modules if m.startswith("fedkernels"))
    heavy = sorted(m for m in {heavy!r} if m in sys.modules)
    print("PROBE " + json.dumps({{"heavy": heavy, "fedkernels": fk}}), file=sys.stderr)
atexit.register(_report)
from fedkernels.cli import app
app({args!r}, prog_name="fedkernels")
"""


def probe(args: list[str]) -> tuple[subprocess.CompletedProcess, dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, args=args)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    line = next(x for x in res.stderr.splitlines() if x.startswith("PROBE "))
    print(f"fedkernels {' '.join(args)}: {wall:.2f} s")
    return res, json.loads(line.removeprefix("PROBE ")), wall


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"], ["train", "--help"], ["export", "--help"]])
def test_help_imports_no_heavy_library(args):
    res, loaded, _ = probe(args)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    assert loaded["heavy"] == []
    assert loaded["fedkernels"] == ["fedkernels", "fedkernels.cli", "fedkernels.errors"]


def test_a_config_error_is_reported_before_torch_is_imported(tmp_path):
    (tmp_path / "c.yaml").write_text("fraction: '0.5'\n")
    res, loaded, _ = probe(["compare", "-c", str(tmp_path / "c.yaml")])
    assert res.returncode == 2
    assert "fraction" in res.stderr and "'0.5'" in res.stderr
    assert loaded["heavy"] == []


def test_lazy_package_attributes_resolve_on_first_use():
    code = ("import sys, fedkernels, fedkernels.federated as f; assert 'torch' not in sys.modules; "
            "from fedkernels import LoRAConfig, lora_linear; from fedkernels.federated import FederatedTrainer; "
            "assert 'torch' in sys.modules and callable(lora_linear); "
            "assert FederatedTrainer.__name__ == 'FederatedTrainer'; "
            "assert 'inject_lora' in dir(fedkernels)\n"
            "try:\n    fedkernels.nope\nexcept AttributeError as e:\n    print(e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "no attribute 'nope'" in res.stdout
