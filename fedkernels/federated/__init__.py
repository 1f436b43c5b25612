"""In-process federated simulation: config, data partitioning, planning, local training, rounds."""

from fedkernels.federated.config import PRESETS, STRATEGIES, FederatedConfig
from fedkernels.federated.trainer import FederatedTrainer, RunSummary

__all__ = ["PRESETS", "STRATEGIES", "FederatedConfig", "FederatedTrainer", "RunSummary"]
