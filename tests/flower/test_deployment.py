"""A real Flower deployment on loopback: one flower-superlink, three flower-supernode processes, `flwr run`.

Slow (1-2 min each on 2 shared cores): each SuperNode's long-lived ClientApp process (`fedkernels.flower.warm`)
imports torch and prepares the model once; the ServerApp does the same.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkernels.federated import FederatedConfig, FederatedTrainer  # noqa: E402
from fedkernels.federated.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from fedkernels.flower.launch import LocalDeployment, example_app_dir, node_configs_for  # noqa: E402
from tests.federated.test_trainer import BASE  # noqa: E402

pytestmark = pytest.mark.slow

# the tiny config of the trainer tests, with one SuperNode per client (3 processes on a 2-core machine)
TINY = {**BASE, "num_clients": 3, "fraction": 1.0}


def _deploy_and_run(tmp_path, cfg, budgets, *, kill_node_after_round=None, round_timeout=120.0):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    dep = LocalDeployment(node_configs_for(cfg, budgets), workdir=tmp_path / "flower")
    try:
        dep.start()
        run_config = {"config": str(cfg_file), "output-dir": cfg.output_dir, "round-timeout": round_timeout,
                      "min-nodes": 3}
        if kill_node_after_round is None:
            res = dep.run(example_app_dir(), run_config, timeout=540)
        else:
            import threading

            box = {}
            t = threading.Thread(target=lambda: box.update(res=dep.run(example_app_dir(), run_config, timeout=540)))
            t.start()
            latest = tmp_path / "out" / "checkpoints" / "LATEST"
            deadline = time.time() + 400
            while time.time() < deadline and not (
                    latest.exists() and latest.read_text().strip() >= f"round-{kill_node_after_round:05d}"):
                assert t.is_alive(), dep.logs()
                time.sleep(0.2)
            dep.kill_node(0)  # SIGKILL the SuperNode holding partition 0 and its running ClientApp
            t.join(timeout=540)
            res = box["res"]
        assert res.returncode == 0, res.stdout[-3000:] + dep.logs()
    finally:
        dep.stop()
    assert set(dep.procs) >= {"superlink", "supernode-0", "supernode-1", "supernode-2", "flwr-run",
                              "clientapp-0", "clientapp-1", "clientapp-2"}
    for name, proc in dep.procs.items():
        assert proc.poll() is not None, f"{name} still running"
    assert dep.alive() == [], "process groups with members left after stop()"
    return dep


def _final_global(out_dir):
    tensors, meta = load_checkpoint(latest_checkpoint(out_dir / "checkpoints"))
    return {k: v for k, v in tensors.items() if k.startswith(("global.", "head."))}, meta


def test_loopback_deployment_matches_in_process_trainer(tmp_path):
    ref = FederatedTrainer(FederatedConfig(**{**TINY, "output_dir": str(tmp_path / "ref")}))
    ref.run()
    cfg = FederatedConfig(**{**TINY, "output_dir": str(tmp_path / "out")})
    _deploy_and_run(tmp_path, cfg, ref.budgets)
    got, meta = _final_global(tmp_path / "out")
    want, _ = _final_global(tmp_path / "ref")
    assert meta["round"] == 2 and got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    hist = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [h["succeeded"] for h in hist] == [h["succeeded"] for h in ref.history] == [[0, 1, 2]] * 2
    assert [h["accuracy"] for h in hist] == pytest.approx([h["accuracy"] for h in ref.history])
    wire = json.loads((tmp_path / "out" / "flower_bytes.json").read_text())
    assert [w["round"] for w in wire] == [1, 2] and all(w["bytes_down"] > 0 and w["bytes_up"] > 0 for w in wire)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_killing_a_supernode_mid_run_still_finishes(tmp_path):
    cfg = FederatedConfig(**{**TINY, "output_dir": str(tmp_path / "out")})
    # nodes report no memory-budget here: the config's budget tiers apply
    _deploy_and_run(tmp_path, cfg, None, kill_node_after_round=1, round_timeout=90.0)
    hist = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in hist] == [1, 2]
    assert hist[0]["succeeded"] == [0, 1, 2]
    assert hist[1]["succeeded"] == [1, 2] and not hist[1]["skipped"]
    assert [f["client"] for f in hist[1]["failures"]] == [0]
    assert (tmp_path / "out" / "summary.json").is_file()
