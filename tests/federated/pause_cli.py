"""Test-only entry point: the `fedkernels` CLI, holding still after round N's checkpoint so a test can kill -9 it.

    python tests/federated/pause_cli.py N train --config cfg.json

The pause is a wrapper around `FederatedTrainer.commit_round` installed here, not a hook in the trainer.
"""

import sys
import time

from fedkernels.cli import app
from fedkernels.federated.trainer import FederatedTrainer

PAUSE_AFTER = int(sys.argv.pop(1))
_commit = FederatedTrainer.commit_round


def commit_then_pause(self, record):
    _commit(self, record)
    if self.round == PAUSE_AFTER:
        time.sleep(3600)


FederatedTrainer.commit_round = commit_then_pause
app()
