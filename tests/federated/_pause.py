"""Test-only: make `FederatedTrainer.commit_round` hold still after round N's checkpoint, so a test can kill -9
the process there. Installed by the wrapper entry points pause_cli.py / pause_suite_worker.py; the trainer itself
has no such hook."""

import time

from fedkernels.federated.trainer import FederatedTrainer


def install_pause(after_round: int) -> None:
    commit = FederatedTrainer.commit_round

    def commit_then_pause(self, record):
        commit(self, record)
        if self.round == after_round:
            time.sleep(3600)

    FederatedTrainer.commit_round = commit_then_pause
