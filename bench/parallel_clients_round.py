"""Wall time of one federated round (and its local-training part), one client at a time vs `parallel_clients`.

Usage: ``PYTHONPATH=. python bench/parallel_clients_round.py --model tiny-bert --repeats 3 --threads 1``
Prints one JSON line per setting: min over repeats of the round's wall time and of its ``train`` timing.
Each repeat re-runs round 1 on the same trainer (same sampled clients and plans, same cost).
``measure_memory`` is off: memory measurement is sequential-only and would hide the comparison.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from fedkernels.federated import FederatedConfig, FederatedTrainer
from fedkernels.federated.trainer import _progress

SETTINGS = {
    "tiny-bert": dict(model="tiny-bert", max_examples=240, num_clients=6, fraction=0.5, local_steps=2, batch_size=4,
                      seq_len=32, lora_rank=4, lora_alpha=8, lr=5e-3, budget_tiers=[0.1, 0.5, 1.0], max_eval=60,
                      partition="dirichlet:0.5"),
    "minilm-l6": dict(model="minilm-l6", max_examples=700, num_clients=10, fraction=0.8, local_steps=4, batch_size=8,
                      seq_len=64),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SETTINGS), default="tiny-bert")
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setting = dict(SETTINGS[args.model], rounds=1, measure_memory=False)
    if args.fraction is not None:
        setting["fraction"] = args.fraction
    for pc in [int(x) for x in args.parallel.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            trainer = FederatedTrainer(FederatedConfig(**setting, parallel_clients=pc, output_dir=out))
            walls, trains = [], []
            with _progress(False) as bar:
                for _ in range(args.repeats):
                    rec = trainer._run_round(1, bar)
                    walls.append(rec["wall_s"])
                    trains.append(rec["timings"]["train"])
            print(json.dumps({"model": args.model, "parallel_clients": pc, "clients": len(rec["sampled"]),
                              "threads": args.threads, "repeats": args.repeats, "round_wall_s_min": min(walls),
                              "train_s_min": min(trains), "train_s_all": [round(t, 3) for t in trains],
                              "eval_s": rec["timings"]["eval"]}), flush=True)


if __name__ == "__main__":
    main()
