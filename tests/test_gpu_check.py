"""bench/gpu_check.py: the dry run CI executes, and the driver's failure handling (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench._common import env_list, parse_cases  # noqa: E402


def test_dry_run_lists_every_step_and_exits_0():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                       "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    for name in ("gpu-tier", "lora-linear", "multi-lora", "flexlora-224", "memory-peak"):
        assert name in proc.stdout
    assert "BENCH_LORA_CASES=8192x4096x16xbfloat16" in proc.stdout and "BENCH_MULTI_NS=8" in proc.stdout
    assert "FEDKERNELS_TIER=gpu" in proc.stdout and "tests/ops/gpu" in proc.stdout and "full_round_224" in proc.stdout
    budget = sum(s.timeout_s for s in gpu_check.steps())
    assert budget <= 8 * 60, f"step timeouts add up to {budget} s, above the 8-minute budget"
    assert f"at most {budget} s" in proc.stdout


def test_unknown_step_is_refused():
    assert gpu_check.main(["--dry-run", "--only", "nope"]) == 2


def test_a_failing_or_hanging_step_is_recorded_not_fatal():
    fail = gpu_check.Step("f", "exits 3", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30)
    hang = gpu_check.Step("h", "sleeps", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    ok = gpu_check.Step("o", "passes", [sys.executable, "-c", "print('fine')"], 30)
    skipped = gpu_check.Step("s", "pytest, all skipped", [sys.executable, "-c", "print('1 skipped in 0.1s')",
                                                          "pytest"], 30)
    recs = [gpu_check.run_step(s) for s in (fail, hang, ok, skipped)]
    assert recs[3]["status"].startswith("failed: no test passed")
    assert recs[0]["status"] == "failed" and recs[0]["rc"] == 3 and "boom" in recs[0]["tail"]
    assert recs[1]["status"] == "timeout after 1 s" and recs[1]["seconds"] < 10
    assert recs[2]["status"] == "passed"
    md = gpu_check.summary_markdown({"device": "cuda-test", "started": "now", "seconds": 1.0, "command": "x",
                                     "steps": recs, "figures": {}})
    assert "| h | sleeps | timeout after 1 s |" in md and "| f | exits 3 | failed |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_real_run_without_cuda_exits_2():
    assert gpu_check.main(["--only", "gpu-tier"]) == 2


def test_case_and_list_overrides():
    assert parse_cases("8192x4096x16xbfloat16, 16x32x4xfloat32") == [(8192, 4096, 16, torch.bfloat16),
                                                                      (16, 32, 4, torch.float32)]
    with pytest.raises(ValueError, match="'8192x4096x16'"):
        parse_cases("8192x4096x16")
    with pytest.raises(ValueError, match="xnotatype"):
        parse_cases("1x2x3xnotatype")
    assert env_list("FEDKERNELS_TEST_UNSET_LIST", [4, 8], int) == [4, 8]
