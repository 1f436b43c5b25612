"""The trainer on damaged run folders: a NaN checkpoint is skipped, and resume from the previous round still ends
bitwise identical to the uninterrupted run."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedkernels.errors import RunFolderError
from fedkernels.federated import FederatedTrainer
from fedkernels.io import sha256_file
from tests.federated.test_trainer import assert_same_factors, assert_same_history, cfg, global_factors


def test_nan_latest_checkpoint_falls_back_and_resume_matches_the_uninterrupted_run(tmp_path, caplog):
    c = cfg(tmp_path, "run", rounds=2)
    ref = FederatedTrainer(c)
    ref.run()
    want = global_factors(ref)
    latest = tmp_path / "run" / "checkpoints" / "round-00002"
    tensors = load_file(str(latest / "state.safetensors"))
    key = next(k for k in tensors if k.startswith("global.") and k.endswith(".B"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(latest / "state.safetensors"))
    digests = json.loads((latest / "digests.json").read_text())  # re-signed: the finite check must catch it
    digests["state.safetensors"] = sha256_file(latest / "state.safetensors")
    (latest / "digests.json").write_text(json.dumps(digests))

    resumed = FederatedTrainer(c)
    with caplog.at_level(logging.INFO, "fedkernels.federated"):
        resumed.run(resume=True)
    assert any("round-00002" in r.getMessage() and key in r.getMessage() and "NaN" in r.getMessage()
               for r in caplog.records)
    assert any(r.getMessage().startswith("resumed from") and r.getMessage().endswith("round-00001 at round 1")
               for r in caplog.records)
    assert_same_factors(want, global_factors(resumed))
    assert_same_history(resumed.history, ref.history)


def test_fresh_trainer_run_in_a_used_folder_is_refused_and_leaves_it_alone(tmp_path):
    c = cfg(tmp_path, "run", rounds=1)
    FederatedTrainer(c).run()
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    again = FederatedTrainer(c)
    with pytest.raises(RunFolderError, match="already holds a run"):
        again.run()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the error
    FederatedTrainer(c, overwrite=True).run()
