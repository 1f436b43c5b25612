"""Runs the Triton kernel tiers, each in a fresh pytest process with its own environment.

- interpreter: kernels executed by ``TRITON_INTERPRET=1`` on CPU tensors (set before triton is imported).
- compile: kernels compiled ahead of time for sm_80 / sm_90 on the CPU (no GPU needed).
- gpu: real shapes in bf16, only when CUDA is available.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _run_tier(tier: str, folder: str, extra_env: dict[str, str]) -> None:
    pytest.importorskip("triton")
    tests = sorted((HERE / folder).glob("test_*.py"))
    if not tests:
        pytest.skip(f"no tests in the {tier} tier yet")
    env = dict(os.environ, FEDKERNELS_TIER=tier, **extra_env)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *map(str, tests)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    tail = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{tier} tier failed (exit {proc.returncode}):\n{tail}"


def test_interpreter_tier():
    _run_tier("interpreter", "interpreter", {"TRITON_INTERPRET": "1"})


def test_compile_tier():
    _run_tier("compile", "compile_tier", {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier needs CUDA")
def test_gpu_tier():
    _run_tier("gpu", "gpu", {})
