"""Compatibility facade: the memory model and its measurement under their earlier common name.

The code lives in three modules since issue 11: `solvers.memory_model` (the model, no torch),
`solvers.measure` (measurement on a torch model) and `solvers.calibration` (fitting the model by
measurement). Importing this module imports torch; `import solvers` and `solvers.strategies` do not.
"""

from __future__ import annotations

from solvers._analytic import PRESETS, default_dtype
from solvers.calibration import calibrate, fit
from solvers.measure import (
    LossFn,
    Measurement,
    default_loss,
    find_lora_params,
    measure,
    measure_peak,
    random_batch,
    set_trainable,
)
from solvers.memory_model import MemoryModel, calibrate_from
from solvers.memspec import ModuleSpec, infer_blocks

__all__ = [
    "PRESETS",
    "LossFn",
    "Measurement",
    "MemoryModel",
    "ModuleSpec",
    "calibrate",
    "calibrate_from",
    "default_dtype",
    "default_loss",
    "find_lora_params",
    "fit",
    "infer_blocks",
    "measure",
    "measure_peak",
    "random_batch",
    "set_trainable",
]
