"""Test-only entry point: the suite's run worker, holding still after round N's checkpoint so a test can kill it.

    python tests/federated/pause_suite_worker.py N RUN_FOLDER

Like pause_cli.py, the pause wraps `FederatedTrainer.commit_round` here; the trainer has no such hook.
"""

import sys
import time

from fedkernels.federated.suite import worker
from fedkernels.federated.trainer import FederatedTrainer

PAUSE_AFTER = int(sys.argv[1])
_commit = FederatedTrainer.commit_round


def commit_then_pause(self, record):
    _commit(self, record)
    if self.round == PAUSE_AFTER:
        time.sleep(3600)


FederatedTrainer.commit_round = commit_then_pause
sys.exit(worker(sys.argv[2]))
