"""One round of server-side aggregation for a 7B-like adapter set, against dense baselines in the same run.

Setting: 10 clients with ranks [4, 4, 8, 8, 16, 16, 32, 32, 64, 64] (S = 248 stacked ranks), global rank 64,
modules of d = k (1024, 2048 on the CPU; 4096 on a GPU), fp32 factors, FedAvg weights p_k times LoRA scale 16/r_k.

- ``flexlora``: `fedkernels.ops.flexlora_redistribute` (stack + QR-of-factors SVD + 11 rank-r splits, batched over
  modules) vs a loop of ``torch.linalg.svd(B_stack @ A_stack)`` over the same modules (what FlexLoRA's code does).
  The dense SVD costs ~2 s per 2048^2 module on one core, so the comparison runs on a subset of modules
  (``COMPARE_MODULES``) and the per-module ratio is reported; the full 32 x 7 = 224-module round is timed for the
  QR route alone (`fedkernels.aggregation` "flexlora" rule, end to end).
- ``merge``: `fedkernels.ops.merge_stacked` (one baddbmm / one Triton launch over 32 modules) vs a per-client loop
  of ``W += p_k s_k B_k A_k``.
- accuracy: fp32 QR-route singular values vs float64 dense ones.

Timings are medians of ``BENCH_ROUNDS`` (default 5) round-robin rounds (candidates interleaved, so load from other
jobs on this shared 2-core box hits all of them alike); in the FlexLoRA comparison each candidate runs once untimed
right before its timed call, so both are timed warm, as in a real round where module after module goes through
the same route (timed right after a 2 s dense SVD, the 20 ms QR route ran 2-4 ms slower).
torch runs with ``BENCH_THREADS`` threads (default 1: with 2 threads on a box shared with
other jobs OpenMP barriers made timings vary 5-20x). Results: ``bench/results/<device>-aggregation.json``.

Run: ``PYTHONPATH=$PWD python -m pytest bench/bench_aggregation.py --benchmark-enable -q``
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench._common import time_interleaved
from fedkernels import aggregation
from fedkernels.ops import factor_svd, flexlora_redistribute, merge_stacked, stack_lora

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# issue 4's setting; BENCH_CLIENT_RANKS="4,4,8,8,16,16,32,32" reproduces the kernels.md prototype's (S = 120)
CLIENT_RANKS = [int(r) for r in os.environ.get("BENCH_CLIENT_RANKS", "4,4,8,8,16,16,32,32,64,64").split(",")]
R_GLOBAL = max(CLIENT_RANKS)
DEFAULT_SETTING = CLIENT_RANKS == [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
ALPHA = 16.0
DIMS = [4096] if DEVICE.type == "cuda" else [1024, 2048]
COMPARE_MODULES = {1024: 4, 2048: 4, 4096: 2}  # 4 at 2048: the chunk the rule factorises at a time on the CPU
LAYERS, MODULES_PER_LAYER = 32, 7
MERGE_MODULES = 32
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
RESULTS: dict[str, dict] = {}


def device_name() -> str:
    if DEVICE.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(DEVICE).lower().replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


RESULTS_FILE = Path(__file__).parent / "results" / f"{device_name()}-aggregation.json"


@pytest.fixture(scope="module", autouse=True)
def _threads_and_results():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)
    if RESULTS:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name(), "torch": torch.__version__, "threads": THREADS,
                "client_ranks": CLIENT_RANKS, "global_rank": R_GLOBAL, "dtype": "float32",
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        merged = {}
        if RESULTS_FILE.exists():  # a partial run (-k) updates its own entries and keeps the others
            merged = json.loads(RESULTS_FILE.read_text()).get("results", {})
        merged.update(RESULTS)
        RESULTS_FILE.write_text(json.dumps({"meta": meta, "results": merged}, indent=2) + "\n")


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, rewarm: bool = False) -> dict[str, float]:
    """Median seconds per call of each candidate, run round-robin in this process (see `_common`)."""
    return time_interleaved(fns, device=DEVICE, rounds=rounds, warmup=1, rewarm=rewarm)


def clients(M: int, d: int, seed: int = 0, dtype=torch.float32):
    """Random (never zero) trained-looking factors: A ~ U(+-1/sqrt(d)) (peft init scale), B ~ N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    As = [((torch.rand(M, r, d, generator=g) * 2 - 1) / d**0.5).to(DEVICE, dtype) for r in CLIENT_RANKS]
    Bs = [(torch.randn(M, d, r, generator=g) * 0.02).to(DEVICE, dtype) for r in CLIENT_RANKS]
    n = torch.randint(50, 500, (len(CLIENT_RANKS),), generator=g).double()
    p = (n / n.sum()).tolist()
    scales = [ALPHA / r for r in CLIENT_RANKS]
    weights = [pk * sk for pk, sk in zip(p, scales, strict=True)]
    return As, Bs, weights, scales


def dense_flexlora(A_s: torch.Tensor, B_s: torch.Tensor, scales: list[float]) -> list:
    """FlexLoRA as its code does it: dense W per module, full SVD, truncations."""
    out = []
    for j in range(A_s.shape[0]):
        W = B_s[j] @ A_s[j]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        for r, s in zip([R_GLOBAL] + CLIENT_RANKS, [ALPHA / R_GLOBAL] + scales, strict=True):
            root = torch.sqrt(S[:r] / s)
            out.append((root[:, None] * Vh[:r], U[:, :r] * root))
    return out


@pytest.mark.parametrize("d", DIMS)
def test_flexlora_qr_vs_dense_svd(benchmark, d):
    M = COMPARE_MODULES[d]
    As, Bs, w, scales = clients(M, d)
    A_s, B_s = stack_lora(As, Bs, w)
    ranks = [R_GLOBAL] + CLIENT_RANKS
    out_scales = [ALPHA / R_GLOBAL] + scales

    def ours():
        return flexlora_redistribute(As, Bs, w, ranks, scales=out_scales)

    t = interleaved({"qr": ours, "dense": lambda: dense_flexlora(A_s, B_s, scales)}, rounds=ROUNDS, rewarm=True)
    benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    # accuracy of the fp32 QR route against float64 dense singular values (first module)
    _, s32, _ = factor_svd(B_s[:1], A_s[:1])
    s64 = torch.linalg.svdvals(B_s[0].double() @ A_s[0].double())[: s32.shape[-1]]
    s32 = s32[0].double()
    top = slice(0, R_GLOBAL)
    rel_top = float(((s32[top] - s64[top]).abs() / s64[top]).max())
    rel_all = float((s32 - s64).abs().max() / s64[0])
    key = f"flexlora_d{d}" + (f"_threads{THREADS}" if THREADS != 1 else "")
    key += "" if DEFAULT_SETTING else f"_S{sum(CLIENT_RANKS)}"
    RESULTS[key] = {
        "modules_compared": M, "stacked_rank": sum(CLIENT_RANKS), "client_ranks": CLIENT_RANKS,
        "qr_route_s_per_module": t["qr"] / M, "dense_svd_s_per_module": t["dense"] / M,
        "speedup": t["dense"] / t["qr"],
        "sv_max_rel_err_top_global_rank_vs_fp64": rel_top, "sv_max_err_over_smax_all_vs_fp64": rel_all,
        "target_100x_at_2048_met": (t["dense"] / t["qr"] >= 100) if d == 2048 and DEFAULT_SETTING else None,
        "loadavg_1min": os.getloadavg()[0], "threads": THREADS,
    }
    print(f"\nd={d}: QR route {t['qr'] / M * 1e3:.1f} ms/module, dense SVD {t['dense'] / M * 1e3:.0f} ms/module, "
          f"x{t['dense'] / t['qr']:.1f}; sv rel err top-{R_GLOBAL} {rel_top:.2e}, all/smax {rel_all:.2e}")
    assert rel_top < 1e-5
    # The >= 100x target (issue 4) is recorded, not asserted: on this shared 2-core box the ratio moves with the
    # other jobs' load (101-103x in seven quiet runs of this setting); a 10x floor still catches a broken route.
    assert t["dense"] / t["qr"] >= 10


@pytest.mark.parametrize("d", DIMS)
def test_flexlora_full_round_224_modules(benchmark, d):
    """End to end: the registry's flexlora rule on 32 layers x 7 modules, 10 clients training everything."""
    names = [f"layers.{layer}.m{j}" for layer in range(LAYERS) for j in range(MODULES_PER_LAYER)]
    M = len(names)
    As, Bs, w, scales = clients(M, d, seed=1)
    g = torch.Generator().manual_seed(2)
    gs = aggregation.GlobalState(
        {m: ((torch.rand(R_GLOBAL, d, generator=g) - 0.5).to(DEVICE), torch.zeros(d, R_GLOBAL, device=DEVICE))
         for m in names},
        {m: ALPHA / R_GLOBAL for m in names},
    )
    n = [int(1000 * x) + 1 for x in w]
    ups = [aggregation.ClientUpdate(client_id=k, factors={m: (As[k][j], Bs[k][j]) for j, m in enumerate(names)},
                                    ranks={m: r for m in names}, scales={m: scales[k] for m in names},
                                    num_samples=n[k])
           for k, r in enumerate(CLIENT_RANKS)]
    plans = {k: {m: r for m in names} for k, r in enumerate(CLIENT_RANKS)}
    rule = aggregation.get("flexlora")
    # one warm-up round first: a server aggregates round after round (scratch buffers, allocator state warm)
    res = benchmark.pedantic(lambda: rule.aggregate(gs, ups, plans), rounds=1, warmup_rounds=1)
    # clients whose alpha/r differs from the global one (all but the rank-64 ones) get their own split
    assert not res.rejected and len(res.client_starts) == sum(r != R_GLOBAL for r in CLIENT_RANKS)
    secs = benchmark.stats.stats.median if benchmark.stats else None
    RESULTS[f"flexlora_round_224_d{d}"] = {"modules": M, "seconds": secs, "loadavg_1min": os.getloadavg()[0],
                                         "threads": THREADS}
    print(f"\nd={d}: flexlora round over {M} modules: {secs} s")


@pytest.mark.parametrize("d", DIMS)
def test_merge_stacked_vs_client_loop(benchmark, d):
    M = MERGE_MODULES
    As, Bs, w, _ = clients(M, d, seed=3)
    A_s, B_s = stack_lora(As, Bs, w)
    W = torch.randn(M, d, d, device=DEVICE) * 0.02

    def ours():
        merge_stacked(W, A_s, B_s, 1.0)

    def per_client_loop():  # W += w_k B_k A_k, module by module, client by client
        for k in range(len(As)):
            for j in range(M):
                W[j].addmm_(Bs[k][j], As[k][j], alpha=w[k])

    def per_client_batched():  # one baddbmm per client over the modules (reads/writes W once per client)
        for k in range(len(As)):
            W.baddbmm_(Bs[k], As[k], alpha=w[k])

    t = interleaved({"stacked": ours, "loop": per_client_loop, "client_batched": per_client_batched}, rounds=3)
    benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    # correctness on a copy: stacked merge equals the loop
    W0 = torch.randn(2, d, d, device=DEVICE)
    a = W0.clone()
    merge_stacked(a, A_s[:2], B_s[:2], 1.0)
    b = W0.double()
    for k in range(len(As)):
        b += w[k] * Bs[k][:2].double() @ As[k][:2].double()
    err = float((a.double() - b).abs().max())
    RESULTS[f"merge_d{d}"] = {
        "modules": M, "stacked_s": t["stacked"], "per_client_loop_s": t["loop"],
        "per_client_batched_s": t["client_batched"], "speedup_vs_loop": t["loop"] / t["stacked"],
        "speedup_vs_client_batched": t["client_batched"] / t["stacked"], "max_abs_err_vs_fp64": err,
        "loadavg_1min": os.getloadavg()[0], "threads": THREADS,
    }
    print(f"\nd={d}: merge {M} modules stacked {t['stacked'] * 1e3:.0f} ms, per-client loop {t['loop'] * 1e3:.0f} ms "
          f"(x{t['loop'] / t['stacked']:.1f}), per-client baddbmm {t['client_batched'] * 1e3:.0f} ms; err {err:.1e}")
    assert err < 1e-4
