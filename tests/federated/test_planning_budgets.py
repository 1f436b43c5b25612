"""`read_budgets_csv`: the trainer's budget file goes through solvers' one parser (issue 12 item 17)."""

import pytest

from fedkernels.errors import ConfigError
from fedkernels.federated.planning import read_budgets_csv


def test_ids_kept_and_duplicates_rejected_with_line(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("client,budget\n1,2GiB\n0,1GiB\n")
    assert read_budgets_csv(f, 2) == {0: 2**30, 1: 2 * 2**30}
    f.write_text("0,1GiB\n1,2GiB\n1,3GiB\n")
    with pytest.raises(ConfigError, match=r"b.csv:3: duplicate client id 1"):
        read_budgets_csv(f, 2)
    f.write_text("0,1GiB\n1,1e308TiB\n")
    with pytest.raises(ConfigError, match="too large"):
        read_budgets_csv(f, 2)
    f.write_text("0,1GiB\n5,2GiB\n")
    with pytest.raises(ConfigError, match=r"no budget for clients \[1\]"):
        read_budgets_csv(f, 2)
    f.write_text("0,1GiB\n1,1GiB\n7,2GiB\n")
    with pytest.raises(ConfigError, match=r"client ids \[7\] outside 0..1"):
        read_budgets_csv(f, 2)


def test_calibration_cache_across_processes_is_reused_and_survives_a_torn_file(tmp_path, monkeypatch, caplog):
    """``$FEDKERNELS_CALIBRATION_DIR``: the second trainer loads the first one's calibration instead of measuring;
    a torn file is measured again (and rewritten), never trusted."""
    from fedkernels.federated import planning
    from fedkernels.federated.trainer import FederatedTrainer
    from solvers.memory_model import MemoryModel
    from tests.federated.test_trainer import cfg as trainer_cfg

    cache = tmp_path / "cache"
    monkeypatch.setenv(planning.CALIBRATION_DIR_ENV, str(cache))
    planning._CALIBRATED.clear()
    first = FederatedTrainer(trainer_cfg(tmp_path, "a", strategy="fedpilot"))
    files = list(cache.glob("*.json"))
    assert len(files) == 1

    planning._CALIBRATED.clear()  # a fresh process: only the disk remembers
    real = MemoryModel.from_model
    monkeypatch.setattr(MemoryModel, "from_model", classmethod(lambda *a, **k: pytest.fail("measured again")))
    second = FederatedTrainer(trainer_cfg(tmp_path, "b", strategy="fedpilot"))
    assert second.planner.memory.to_dict() == first.planner.memory.to_dict()
    assert second.budgets == first.budgets

    files[0].write_text(files[0].read_text()[:40])  # torn write
    planning._CALIBRATED.clear()
    calls = []
    monkeypatch.setattr(MemoryModel, "from_model",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real.__func__(cls, *a, **k)))
    with caplog.at_level("WARNING", logger="fedkernels.federated"):
        third = FederatedTrainer(trainer_cfg(tmp_path, "c", strategy="fedpilot"))
    assert third.planner.memory.to_dict() == planning._CALIBRATED[next(iter(planning._CALIBRATED))].to_dict()
    assert calls == [1] and "unusable" in caplog.text
    key, measured = next(iter(planning._CALIBRATED.items()))
    rewritten = planning.load_cached_calibration(key)
    assert rewritten is not None and rewritten.to_dict() == measured.to_dict()
    planning._CALIBRATED.clear()
