import numpy as np
import pytest

from fedkernels.errors import ConfigError
from fedkernels.federated import FederatedConfig
from fedkernels.federated.data import partition, partition_dirichlet, partition_pathological, rng_for


def test_overrides_parse_by_type_and_quote_bad_values(tmp_path):
    cfg = FederatedConfig().with_overrides(
        ["rounds=3", "lora_targets=query,key", "budget_tiers=0.2,1", "faults=3:nan", "fraction=0.5", "budgets=none"]
    )
    assert (cfg.rounds, cfg.lora_targets, cfg.budget_tiers, cfg.faults, cfg.fraction) == (
        3, ["query", "key"], [0.2, 1.0], {"3": "nan"}, 0.5)
    with pytest.raises(ConfigError, match="'abc'"):
        cfg.with_overrides({"rounds": "abc"})
    with pytest.raises(ConfigError, match="'fedx'"):
        FederatedConfig(strategy="fedx")
    with pytest.raises(ConfigError, match="'dirichlet:-1'"):
        FederatedConfig(partition="dirichlet:-1")
    with pytest.raises(ConfigError, match="1.5"):
        FederatedConfig(fraction=1.5)
    with pytest.raises(ConfigError, match="'nope'"):
        cfg.with_overrides({"nope": "1"})
    with pytest.raises(ConfigError, match="'explode'"):
        FederatedConfig(faults={"1": "explode"})


def test_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("rounds: 7\nstrategy: fedra\nlora_targets: [query]\n")
    (tmp_path / "b.toml").write_text("[federated]\nrounds = 2\npartition = 'iid'\n")
    assert FederatedConfig.from_file(tmp_path / "a.yaml").rounds == 7
    assert FederatedConfig.from_file(tmp_path / "b.toml").partition == "iid"
    (tmp_path / "c.yaml").write_text("roundz: 7\n")
    with pytest.raises(ConfigError, match="roundz"):
        FederatedConfig.from_file(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        FederatedConfig.from_file(tmp_path / "missing.yaml")


LABELS = np.repeat(np.arange(5), [60, 40, 50, 70, 30])


@pytest.mark.parametrize("spec", [("iid", None), ("dirichlet", 0.5), ("dirichlet", 0.1), ("pathological", 2)])
def test_partitions_cover_every_example_once_and_are_seeded(spec):
    a = partition(LABELS, 10, spec, seed=3)
    b = partition(LABELS, 10, spec, seed=3)
    c = partition(LABELS, 10, spec, seed=4)
    allidx = np.concatenate(a)
    assert len(allidx) == len(LABELS) and len(np.unique(allidx)) == len(LABELS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        parts = partition_dirichlet(LABELS, 10, alpha, rng_for(0), min_size=1)
        return np.mean([len(np.unique(LABELS[p])) for p in parts])

    assert mean_classes(0.05) < mean_classes(100.0)
    assert mean_classes(100.0) == 5


def test_pathological_gives_k_classes():
    parts = partition_pathological(LABELS, 10, 2, rng_for(0))
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    with pytest.raises(ConfigError, match="got 9"):
        partition_pathological(LABELS, 10, 9, rng_for(0))
