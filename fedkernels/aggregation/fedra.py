"""FedRA (Su et al., ECCV 2024, arXiv 2311.11227): each layer's adapter is averaged over the clients whose random
allocation row held that layer (algorithms.md sec. 5). On the server this is the per-module FedAvg of `FedIT`
(weights renormalised over the module's trainers, modules nobody trained left unchanged); the allocation itself
lives in `solvers.strategies`."""

from __future__ import annotations

from fedkernels.aggregation.fedit import FedIT

__all__ = ["FedRA"]


class FedRA(FedIT):
    name = "fedra"
