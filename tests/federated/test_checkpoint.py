"""Checkpoint folders: digests, fallback to the previous good round, metadata and tensor checks, cleanup order."""

import json
import logging

import pytest
import torch

from fedkernels.errors import CheckpointError
from fedkernels.federated.checkpoint import (
    RunState,
    load_checkpoint,
    load_latest,
    round_folders,
    save_checkpoint,
)
from fedkernels.io import sha256_file

MODULES = ["enc.0.q", "enc.0.v"]


def state(round_idx, rounds=5, fill=1.0):
    g = torch.Generator().manual_seed(round_idx)
    return RunState(
        round=round_idx, config={"rounds": rounds},
        factors={m: (torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g) * fill) for m in MODULES},
        head={"weight": torch.randn(3, 8, generator=g), "bias": torch.zeros(3)},
        rule_state={"coverage": torch.ones(2), "note": "x"}, rng=torch.get_rng_state(), planner={"measured": {}},
        budgets={"0": 100}, starts={1: {MODULES[0]: (torch.ones(2, 16), torch.ones(8, 2))}},
    )


EXPECTED = {**{f"global.{m}.A": torch.Size([4, 16]) for m in MODULES},
            **{f"global.{m}.B": torch.Size([8, 4]) for m in MODULES},
            "head.weight": torch.Size([3, 8]), "head.bias": torch.Size([3])}


def parse(tensors, meta, folder):
    return RunState.from_tensors(tensors, meta, expected=EXPECTED, source=folder)


def save(root, st):
    return save_checkpoint(root, st.round, *st.to_tensors())


def rewrite_meta(folder, **changes):
    """Edit state.json and re-sign it, so the metadata checks (not the digest) must catch the edit."""
    meta = json.loads((folder / "state.json").read_text())
    meta.update(changes)
    (folder / "state.json").write_text(json.dumps(meta))
    digests = json.loads((folder / "digests.json").read_text())
    digests["state.json"] = sha256_file(folder / "state.json")
    (folder / "digests.json").write_text(json.dumps(digests))


def test_round_trip_keeps_every_tensor(tmp_path):
    st = state(3)
    folder = save(tmp_path, st)
    back = parse(*load_checkpoint(folder), folder)
    assert back.round == 3 and back.config == {"rounds": 5} and back.rule_state["note"] == "x"
    for m in MODULES:
        assert torch.equal(back.factors[m][0], st.factors[m][0]) and torch.equal(back.factors[m][1], st.factors[m][1])
    assert torch.equal(back.starts[1][MODULES[0]][1], st.starts[1][MODULES[0]][1])
    assert torch.equal(back.rng, st.rng) and torch.equal(back.rule_state["coverage"], torch.ones(2))


def test_flipped_bytes_fall_back_to_the_previous_round_with_a_warning(tmp_path, caplog):
    save(tmp_path, state(1))
    latest = save(tmp_path, state(2))
    data = bytearray((latest / "state.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors itself would load this silently
    (latest / "state.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "fedkernels.federated"):
        folder, st = load_latest(tmp_path, parse)
    assert folder.name == "round-00001" and st.round == 1
    assert any("round-00002" in r.getMessage() and "state.safetensors" in r.getMessage() and "SHA-256" in
               r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [99, -3, True, "2"])
def test_round_out_of_range_or_mistyped_is_rejected(tmp_path, bad):
    save(tmp_path, state(1))
    latest = save(tmp_path, state(2))
    rewrite_meta(latest, round=bad)
    with pytest.raises(CheckpointError, match="round"):
        parse(*load_checkpoint(latest), latest)
    assert load_latest(tmp_path, parse)[1].round == 1


def test_nan_state_is_rejected_naming_the_tensor(tmp_path):
    latest = save(tmp_path, state(2, fill=float("nan")))
    with pytest.raises(CheckpointError, match=r"global\.enc\.0\.q\.B.*NaN"):
        parse(*load_checkpoint(latest), latest)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*NaN"):
        load_latest(tmp_path, parse)


def test_missing_keys_are_typed_errors_naming_file_and_key(tmp_path):
    folder = save(tmp_path, state(1))
    tensors, meta = load_checkpoint(folder)
    del tensors["head.bias"]
    with pytest.raises(CheckpointError, match=r"state\.safetensors.*'head\.bias'"):
        parse(tensors, meta, folder)
    tensors, meta = load_checkpoint(folder)
    del meta["planner"]
    with pytest.raises(CheckpointError, match=r"state\.json.*'planner'"):
        parse(tensors, meta, folder)
    tensors, meta = load_checkpoint(folder)
    del tensors[f"start.1.{MODULES[0]}.A"]
    with pytest.raises(CheckpointError, match=r"start\.1\.enc\.0\.q\.A"):
        parse(tensors, meta, folder)


def test_wrong_shape_is_rejected(tmp_path):
    folder = save(tmp_path, state(1))
    tensors, meta = load_checkpoint(folder)
    tensors["head.weight"] = torch.zeros(3, 9)
    with pytest.raises(CheckpointError, match=r"'head\.weight' has shape \(3, 9\).*\(3, 8\)"):
        parse(tensors, meta, folder)


def test_missing_digests_file_is_refused(tmp_path):
    folder = save(tmp_path, state(1))
    (folder / "digests.json").unlink()
    with pytest.raises(CheckpointError, match="digests.json"):
        load_checkpoint(folder)


@pytest.mark.parametrize("pointer", [None, "../elsewhere/round-00009", "/tmp/round-00002", "round-00007"])
def test_latest_missing_or_outside_the_folder_falls_back_to_the_newest_round(tmp_path, caplog, pointer):
    save(tmp_path, state(1))
    save(tmp_path, state(2))
    if pointer is None:
        (tmp_path / "LATEST").unlink()
    else:
        (tmp_path / "LATEST").write_text(pointer)
    with caplog.at_level(logging.WARNING, "fedkernels.federated"):
        folder, st = load_latest(tmp_path, parse)
    assert folder.name == "round-00002" and st.round == 2
    assert any("LATEST" in r.getMessage() for r in caplog.records)


def test_nothing_to_load_is_a_typed_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_latest(tmp_path, parse)


def test_cleanup_keeps_the_newest_rounds_of_this_run_by_number(tmp_path):
    for r in (5, 6):  # an older, longer run's folders
        save(tmp_path, state(r, rounds=6))
    for r in (1, 2):  # the new run: a name sort would keep round-00005/06 and delete these
        save(tmp_path, state(r))
    assert [r for r, _ in round_folders(tmp_path)] == [2, 1]
    assert (tmp_path / "LATEST").read_text() == "round-00002"
    big = tmp_path / "big"
    for r in (99998, 99999, 100000):  # "round-100000" < "round-99998" as names
        save(big, state(r, rounds=100000))
    assert [r for r, _ in round_folders(big)] == [100000, 99999]


def test_save_leaves_no_temp_folder(tmp_path):
    save(tmp_path, state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "round-00001"]
    assert sorted(p.name for p in (tmp_path / "round-00001").iterdir()) == ["digests.json", "state.json",
                                                                           "state.safetensors"]
