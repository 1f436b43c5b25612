"""One GPU check for when a device is lent (issue 11 item 8): ``make gpu-check`` or ``python bench/gpu_check.py``.

Steps, each in its own process with its own timeout, so that one hang or crash is recorded and the rest still run
(budget: 8 minutes on one H100/H200; the step timeouts add up to 450 s plus start-up):

1. ``gpu-tier``     the GPU test tier, ``pytest tests/ops/gpu`` (real shapes, bf16).
2. ``lora-linear``  bench/bench_lora_linear.py at the issue-3 size T=8192, d=4096, r=16, bf16.
3. ``multi-lora``   bench/bench_multi_lora.py at n=8 clients (T=8192, d=4096, r=16, bf16 on CUDA).
4. ``flexlora-224`` bench/bench_aggregation.py: one 224-module FlexLoRA round (d=4096 on CUDA).
5. ``memory-peak``  the allocator peak of one LoRA training step on CUDA through the solvers package's
                    ``measure_peak`` (``solvers.measure`` or ``solvers.memory``); "not available" when the
                    installed solvers has none.

Writes ``bench/results/gpu-<device>.json`` (every step: command, exit status, seconds, output tail, figures) and
``bench/results/gpu-<device>.md`` (a table for the README). Exit status 0 when every step passed, 1 otherwise.
``--dry-run`` lists the steps and exits 0 without touching CUDA (what CI runs); ``--only NAME`` runs some steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: The issue-3 sizes of the two layer benchmarks.
LORA_CASE = "8192x4096x16xbfloat16"
MULTI_CLIENTS = "8"


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)


def steps() -> list[Step]:
    py = sys.executable
    bench = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s"]
    return [
        # tests/conftest.py collects a tier folder only when FEDKERNELS_TIER names it
        Step("gpu-tier", "GPU test tier (tests/ops/gpu)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                                          "tests/ops/gpu"], 120, {"FEDKERNELS_TIER": "gpu"}),
        Step("lora-linear", "masked LoRA linear fwd+bwd at T=8192 d=4096 r=16 bf16 vs base / peft",
             [*bench, "bench/bench_lora_linear.py"], 90, {"BENCH_LORA_CASES": LORA_CASE}),
        Step("multi-lora", "multi-client LoRA at n=8 (T=8192 d=4096 r=16 bf16) vs single / loop / peft",
             [*bench, "bench/bench_multi_lora.py"], 90,
             {"BENCH_MULTI_NS": MULTI_CLIENTS, "BENCH_MULTI_MIXES": "uniform,distinct"}),
        Step("flexlora-224", "one 224-module FlexLoRA round (d=4096)",
             [*bench, "bench/bench_aggregation.py", "-k", "full_round_224"], 90, {"BENCH_ROUNDS": "3"}),
        Step("memory-peak", "allocator peak of one LoRA training step on CUDA (solvers measure_peak)",
             [py, str(Path(__file__).resolve()), "--memory-peak-step"], 60),
    ]


# ------------------------------------------------------------------------------------------------ memory step
def _find_measure_peak():
    """``measure_peak`` from the solvers package (solvers.measure, then solvers.memory), or None."""
    import importlib

    for mod in ("solvers.measure", "solvers.memory"):
        try:
            fn = getattr(importlib.import_module(mod), "measure_peak", None)
        except ImportError:
            continue
        if fn is not None:
            return mod, fn
    return None


def memory_peak_step() -> int:
    """Child process of step 5: prints one JSON line with the figures (or ``available: false``)."""
    found = _find_measure_peak()
    if found is None:
        print(json.dumps({"available": False, "note": "not available: no measure_peak in solvers.measure or "
                                                      "solvers.memory"}))
        return 0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedkernels.nn import LoRAConfig, inject_lora, lora_modules

    if not torch.cuda.is_available():
        print(json.dumps({"available": True, "error": "CUDA is not available"}))
        return 1
    mod, measure_peak = found
    # A 1B-class block shape (hidden 2048, 16 heads of 128, 4 KV heads), kept to 4 layers so the step takes seconds;
    # bf16, batch 4 x 512 tokens, LoRA r=16 on q/v/down: activations (~1 GiB) dominate the peak, as in training.
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    inject_lora(model, LoRAConfig(r=16, alpha=32.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [p for layer in lora_modules(model).values() for p in (layer.lora_A, layer.lora_B)]
    ids = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss_fn(m, b):
        return m(**b).logits.float().pow(2).mean()

    t0 = time.perf_counter()
    meas = measure_peak(model, batch, trainable, loss_fn)
    out = {"available": True, "source": f"{mod}.measure_peak", "seconds": round(time.perf_counter() - t0, 3),
           "setting": "llama h2048 x4 layers, bf16, batch 4x512, LoRA r16 q/v/down, AdamW",
           "device": torch.cuda.get_device_name(0)}
    for k in ("peak_bytes", "reserved_bytes", "saved_bytes", "param_bytes", "grad_bytes", "optimizer_bytes"):
        v = getattr(meas, k, None)
        out[k] = int(v) if v is not None else None
    total = getattr(meas, "total", None)
    out["counted_total_bytes"] = int(total) if total is not None else None
    if out["peak_bytes"] and out["counted_total_bytes"]:
        out["peak_over_counted"] = round(out["peak_bytes"] / out["counted_total_bytes"], 3)
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------ driver
def _device() -> str:
    import torch

    return "cuda-" + torch.cuda.get_device_name(0).lower().replace(" ", "-")


def run_step(step: Step) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **step.env)
    t0 = time.perf_counter()
    rec: dict = {"name": step.name, "what": step.what, "command": " ".join(step.argv), "env": step.env,
                 "timeout_s": step.timeout_s}
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
        rec["rc"] = proc.returncode
        out = proc.stdout + proc.stderr
        rec["status"] = "passed" if proc.returncode == 0 else "failed"
        if rec["status"] == "passed" and "pytest" in step.argv and not re.search(r"\b[1-9]\d* passed", out):
            rec["status"] = "failed: no test passed (all skipped or none collected)"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rec["rc"], rec["status"] = None, f"timeout after {step.timeout_s} s"
    except OSError as exc:
        out, rec["rc"], rec["status"] = str(exc), None, f"could not start: {exc}"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["tail"] = out[-4000:]
    if step.name == "memory-peak" and rec["status"] == "passed":
        try:
            rec["figures"] = json.loads(out.strip().splitlines()[-1])
            if not rec["figures"].get("available", True):
                rec["status"] = "not available"
        except (ValueError, IndexError):
            rec["status"] = "failed: no JSON line from the memory step"
    return rec


def _figures(device: str) -> dict:
    """The benchmark entries this check produced, read back from the benchmarks' own result files."""
    out: dict = {}
    for path in sorted(RESULTS.glob(f"{device}*.json")):
        if path.name.startswith("gpu-"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        flat = data.get("results", data)
        for key, val in flat.items() if isinstance(flat, dict) else []:
            if any(s in key for s in ("T8192_d4096_r16", "n8-", "224")):
                out[f"{path.name}:{key}"] = val
    return out


def summary_markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']}", "", f"{report['started']} UTC, {report['seconds']} s in all; "
             f"command `{report['command']}`.", "", "| step | what | status | seconds |", "|---|---|---|---|"]
    for r in report["steps"]:
        lines.append(f"| {r['name']} | {r['what']} | {r['status']} | {r['seconds']} |")
    mem = next((r.get("figures") for r in report["steps"] if r["name"] == "memory-peak"), None)
    if mem and mem.get("peak_bytes"):
        lines += ["", f"Memory peak ({mem['setting']}): {mem['peak_bytes'] / 2**30:.2f} GiB allocator peak, "
                      f"{(mem.get('counted_total_bytes') or 0) / 2**30:.2f} GiB counted (ratio "
                      f"{mem.get('peak_over_counted')})."]
    if report["figures"]:
        lines += ["", "Benchmark entries written (full records in the JSON):", ""]
        for key, val in report["figures"].items():
            brief = {k: val[k] for k in ("ms", "ratios", "ratio_ours_over_base", "ratio_peft_over_ours",
                                         "ratio_mask_over_nomask") if isinstance(val, dict) and k in val}
            lines.append(f"- `{key}`: {json.dumps(brief) if brief else '(see JSON)'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the steps and exit 0 (no CUDA needed)")
    ap.add_argument("--only", action="append", default=[], help="run only this step (repeatable)")
    ap.add_argument("--memory-peak-step", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_peak_step:
        return memory_peak_step()
    todo = steps()
    names = [s.name for s in todo]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; steps: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.only:
        todo = [s for s in todo if s.name in args.only]
    if args.dry_run:
        budget = sum(s.timeout_s for s in todo)
        print(f"gpu_check: {len(todo)} step(s), at most {budget} s of step timeouts:")
        for s in todo:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            print(f"  {s.name:13s} [{s.timeout_s:3d} s] {s.what}\n      {env + ' ' if env else ''}{' '.join(s.argv)}")
        found = _find_measure_peak()
        print(f"memory-peak uses {found[0]}.measure_peak" if found else
              "memory-peak: not available (no measure_peak in solvers.measure or solvers.memory)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available; run with --dry-run to list the steps", file=sys.stderr)
        return 2
    device = _device()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t0 = time.perf_counter()
    records = []
    for s in todo:
        print(f"gpu_check: {s.name} ...", flush=True)
        rec = run_step(s)
        print(f"gpu_check: {s.name}: {rec['status']} in {rec['seconds']} s", flush=True)
        records.append(rec)
    report = {"device": device, "started": started, "seconds": round(time.perf_counter() - t0, 1),
              "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "steps": records, "figures": _figures(device)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / f"gpu-{device}.json"
    md = RESULTS / f"gpu-{device}.md"
    js.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    md.write_text(summary_markdown(report))
    print(f"gpu_check: wrote {js.relative_to(ROOT)} and {md.relative_to(ROOT)}")
    return 0 if all(r["status"] in ("passed", "not available") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
