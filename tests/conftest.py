import os
import random

import numpy as np
import pytest
import torch

# Kernel tiers run in their own pytest process (tests/ops/test_triton_tiers.py starts it): the interpreter
# tier needs TRITON_INTERPRET=1 set before triton is first imported, which cannot be undone in-process.
# A tier directory is collected only when FEDKERNELS_TIER names it.
_TIERS = {"interpreter": "ops/interpreter/*", "compile": "ops/compile_tier/*", "gpu": "ops/gpu/*"}
collect_ignore_glob = [glob for tier, glob in _TIERS.items() if os.environ.get("FEDKERNELS_TIER") != tier]


@pytest.fixture(autouse=True)
def _seed_everything():
    """Each test starts from the same RNG state, so random data is reproducible per test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
