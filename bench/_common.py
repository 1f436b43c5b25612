"""Shared helpers of the benchmarks: device naming, timing, saved-activation bytes, JSON results.

Results go to ``bench/results/<device>.json`` (e.g. ``cpu-x86_64-2cores.json``), one entry per benchmark key,
merged into what is already there so benchmarks of different ops share one file per device.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def device_name(device: torch.device | str | None = None) -> str:
    """``cuda-nvidia-h100-80gb-hbm3`` on a GPU, ``cpu-<arch>-<n>cores`` otherwise."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(dev).lower().replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def parse_cases(spec: str) -> list[tuple[int, int, int, torch.dtype]]:
    """``"TxDxRxDTYPE,..."`` (``8192x4096x16xbfloat16``) -> ``[(T, d, r, dtype), ...]``; ValueError naming the bad
    entry. How bench/gpu_check.py picks the issue-3 sizes out of a benchmark's own case table."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split("x")
        dtype = getattr(torch, parts[-1], None) if len(parts) == 4 else None
        if not isinstance(dtype, torch.dtype) or not all(p.isdigit() for p in parts[:3]):
            raise ValueError(f"bench case {item!r} must read TxDxRxDTYPE, e.g. 8192x4096x16xbfloat16")
        out.append((int(parts[0]), int(parts[1]), int(parts[2]), dtype))
    return out


def env_list(name: str, default: list, cast: Callable[[str], Any] = str) -> list:
    """Comma-separated environment override of a benchmark's parameter list (``BENCH_MULTI_NS=8``)."""
    raw = os.environ.get(name, "").strip()
    return [cast(x.strip()) for x in raw.split(",") if x.strip()] if raw else list(default)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_threads() -> int:
    """Threads for CPU benchmarks: 1 unless BENCH_THREADS says otherwise.

    Our dev box has 2 cores shared with other jobs; with 2 intra-op threads a GEMM waits at every barrier
    for the thread whose core is busy, and we measured the same base step at 55 ms and 184 ms minutes apart.
    One thread keeps the ratios meaningful.
    """
    return int(os.environ.get("BENCH_THREADS", "1"))


def sample_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device, rounds: int = 15,
                       warmup: int = 2, rewarm: bool = False) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, measured round-robin in the same process.

    Round-robin (base, ours, peft, base, ours, ...) spreads slow phases of a shared machine (our CPU box has
    2 cores shared with other jobs, +-30%) evenly over the candidates, so their ratios stay meaningful. On CUDA
    each round times one call between synchronisations; use `cuda_median_ms` for launch-bound sizes.

    ``rewarm=True`` makes one untimed call of a candidate right before its timed one in every round, so each
    is timed warm (caches, TLB, allocator state of its own previous call) rather than right after a different
    candidate that evicted everything: a 20 ms call timed right after a 2 s dense SVD ran 2-4 ms slower.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if rewarm:
                fn()
                _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return samples


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device, rounds: int = 15,
                     warmup: int = 2, stat: str = "median", rewarm: bool = False) -> dict[str, float]:
    """``stat`` ("median" or "min") seconds per call of each candidate, from `sample_interleaved`."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    pick = statistics.median if stat == "median" else min
    samples = sample_interleaved(fns, device=device, rounds=rounds, warmup=warmup, rewarm=rewarm)
    return {k: pick(v) for k, v in samples.items()}


def cuda_median_ms(fn: Callable[[], Any]) -> float:
    """Median ms of ``fn`` on the GPU with triton's do_bench (flushes L2 between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def saved_activation_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Bytes autograd keeps for backward while ``run()`` builds its graph, counted once per storage.

    Tensors sharing storage with ``exclude`` (parameters, alive anyway) are not counted; inputs such as x are.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def environment() -> dict[str, str]:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device_name()}
    with contextlib.suppress(Exception):
        import triton

        env["triton"] = triton.__version__
    return env


def record(key: str, payload: dict[str, Any], device: str | None = None) -> Path:
    """Merge ``{key: payload}`` into ``bench/results/<device>.json`` (locked, atomic replace)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{device or device_name()}.json"
    with open(RESULTS_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = {**payload, "env": environment(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return path
