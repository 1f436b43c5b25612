"""The core never needs Flower: importing fedkernels (and the CLI, and fedkernels.flower itself) loads no flwr."""

import subprocess
import sys


def test_import_fedkernels_does_not_import_flwr():
    code = ("import sys, fedkernels, fedkernels.cli, fedkernels.flower, fedkernels.federated; "
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.') or m == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
