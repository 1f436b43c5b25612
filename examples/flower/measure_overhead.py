"""Per-round overhead of the Flower path vs the in-process trainer on the same tiny configuration.

    PYTHONPATH=. python examples/flower/measure_overhead.py [--out results.json] [--cold]

Runs the tiny config of tests/federated/test_trainer.py with 3 clients (all sampled every round) for 2 rounds,
in-process and on a loopback deployment (1 flower-superlink + 3 flower-supernode processes, `flwr run`), and
prints per-round wall time (the trainer's own round timer, which on Flower includes the round trip to the
SuperNodes) and bytes (array payload). Process start-up and the one-off node query are reported separately.

By default each SuperNode runs in ``--isolation process`` with one long-lived ClientApp process
(`fedkernels.flower.warm`); ``--cold`` measures Flower's default instead: a fresh ``flwr-clientapp`` process,
which imports torch and rebuilds the model, for every message.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedkernels.federated import FederatedConfig, FederatedTrainer
from fedkernels.flower.launch import LocalDeployment, example_app_dir, node_configs_for

TINY = dict(model="tiny-bert", max_examples=240, num_clients=3, fraction=1.0, rounds=2, local_steps=2, batch_size=4,
            seq_len=32, lora_rank=4, lora_alpha=8, lr=5e-3, budget_tiers=[0.1, 0.5, 1.0], max_eval=60,
            partition="dirichlet:0.5")


def _rounds(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cold", action="store_true", help="a fresh flwr-clientapp per message (Flower's default)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedkernels-overhead-"))

    t = time.perf_counter()
    ref = FederatedTrainer(FederatedConfig(**TINY, output_dir=str(tmp / "inproc")))
    setup_inproc = time.perf_counter() - t
    t = time.perf_counter()
    ref.run()
    run_inproc = time.perf_counter() - t

    cfg = FederatedConfig(**TINY, output_dir=str(tmp / "flower"))
    (tmp / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    t = time.perf_counter()
    with LocalDeployment(node_configs_for(cfg, ref.budgets), workdir=tmp / "work", warm=not args.cold) as dep:
        started = time.perf_counter() - t
        t = time.perf_counter()
        res = dep.run(example_app_dir(), {"config": str(tmp / "cfg.json"), "output-dir": cfg.output_dir,
                                          "round-timeout": 300.0, "min-nodes": 3}, timeout=900)
        run_flower = time.perf_counter() - t
        if res.returncode != 0:
            raise SystemExit(dep.logs())
    inproc, flower = _rounds(tmp / "inproc"), _rounds(tmp / "flower")
    wire = json.loads((tmp / "flower" / "flower_bytes.json").read_text())
    rows = []
    for a, b, w in zip(inproc, flower, wire, strict=True):
        rows.append({"round": a["round"], "inproc_wall_s": a["wall_s"], "flower_wall_s": b["wall_s"],
                     "inproc_train_s": a["timings"]["train"], "flower_train_s": b["timings"]["train"],
                     "inproc_bytes_down": a["bytes_down"], "inproc_bytes_up": a["bytes_up"],
                     "flower_wire_bytes_down": w["bytes_down"], "flower_wire_bytes_up": w["bytes_up"],
                     "flower_client_train_s": [c.get("wall_s") for c in b["clients"]]})
    result = {"config": TINY, "clientapp": "fresh process per message" if args.cold else "long-lived (warm)",
              "inproc_setup_s": setup_inproc, "inproc_run_s": run_inproc,
              "flower_deploy_start_s": started, "flower_run_s": run_flower, "rounds": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
