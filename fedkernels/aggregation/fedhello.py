"""Fed-HeLLo (arXiv 2506.12213; code TNI-playground/Fed_HeLLo @ 4c07f5b, `global_aggregator.py`
`average_lora_depthfl`): per key, the mean over the clients that uploaded it; A and B averaged separately; keys
nobody trained unchanged (algorithms.md sec. 2). The code's default is the plain mean, so ``weighting`` defaults to
"uniform" here; ``weighting="samples"`` gives its ``weighted_average`` option (weights by data size)."""

from __future__ import annotations

from dataclasses import dataclass

from fedkernels.aggregation.fedit import FedIT, FedITOptions

__all__ = ["FedHeLLo", "FedHeLLoOptions"]


@dataclass
class FedHeLLoOptions(FedITOptions):
    weighting: str = "uniform"


class FedHeLLo(FedIT):
    name = "fedhello"
    Options = FedHeLLoOptions
