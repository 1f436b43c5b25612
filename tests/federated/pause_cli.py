"""Test-only entry point: the `fedkernels` CLI, holding still after round N's checkpoint so a test can kill -9 it.

    python tests/federated/pause_cli.py N train --config cfg.json
"""

import sys

from _pause import install_pause

from fedkernels.cli import app

install_pause(int(sys.argv.pop(1)))
app()
