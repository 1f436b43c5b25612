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


@pytest.mark.parametrize(("yaml_text", "match"), [
    ('fraction: "0.5"\n', r"FederatedConfig\.fraction must be a number, got '0\.5' \(str\)"),
    ("rounds: 2.5\n", r"FederatedConfig\.rounds must be an integer, got 2\.5"),
    ("rounds: true\n", r"FederatedConfig\.rounds must be an integer, got True"),
    ("measure_memory: 1\n", r"FederatedConfig\.measure_memory must be true or false, got 1"),
    ("lora_targets: query\n", r"FederatedConfig\.lora_targets must be a list of a string or None, got 'query'"),
    ("budgets: [1GiB, 2]\nnum_clients: 2\n", r"FederatedConfig\.budgets\[1\] must be a string, got 2 \(int\)"),
    ("max_examples: '100'\n", r"FederatedConfig\.max_examples must be an integer or None, got '100'"),
    ("faults: [raise]\n", r"FederatedConfig\.faults must be a mapping"),
])
def test_yaml_types_are_checked_at_load_naming_file_key_and_value(tmp_path, yaml_text, match):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as info:
        FederatedConfig.from_file(tmp_path / "c.yaml")
    assert "c.yaml" in str(info.value)


def test_yaml_natural_spellings_are_widened_not_refused(tmp_path):
    # ints where floats are meant, and int client ids as YAML writes them, are what a user types
    (tmp_path / "c.yaml").write_text("fraction: 1\nlora_alpha: 16\nbudget_tiers: [0, 1]\nfaults: {3: nan}\n")
    cfg = FederatedConfig.from_file(tmp_path / "c.yaml")
    assert (cfg.fraction, cfg.lora_alpha, cfg.budget_tiers, cfg.faults) == (1.0, 16.0, [0.0, 1.0], {"3": "nan"})
    assert isinstance(cfg.fraction, float) and isinstance(cfg.budget_tiers[0], float)


@pytest.mark.parametrize(("key", "value"), [
    ("max_eval", 0), ("max_examples", 0), ("max_examples", -5), ("lora_alpha", float("nan")),
    ("lora_alpha", 0.0), ("lr", float("inf")), ("weight_decay", -0.1),
])
def test_ranges_are_checked_at_load(key, value):
    with pytest.raises(ConfigError, match=rf"FederatedConfig\.{key} .*got {value!r}"):
        FederatedConfig(**{key: value})


def test_fault_keys_must_be_client_ids():
    with pytest.raises(ConfigError, match=r"client id in 0\.\.3, got '4'"):
        FederatedConfig(num_clients=4, faults={"4": "nan"})
    with pytest.raises(ConfigError, match="got 'c1'"):
        FederatedConfig(num_clients=4, faults={"c1": "nan"})
    assert FederatedConfig(num_clients=4, faults={"3": "nan"}).faults == {"3": "nan"}


def test_unparseable_config_files_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("rounds: 2\nlora_targets: [query\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"'.*bad\.yaml' line 3, column 5") as info:
        FederatedConfig.from_file(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "bad.json").write_text('{"rounds": 2,')
    with pytest.raises(ConfigError, match=r"bad\.json"):
        FederatedConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "bin.yaml").write_bytes(b"rounds: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin\.yaml.*not UTF-8"):
        FederatedConfig.from_file(tmp_path / "bin.yaml")
    (tmp_path / "ints.yaml").write_text("1: 2\nrounds: 3\n")
    with pytest.raises(ConfigError, match=r"unknown FederatedConfig keys \[1\]"):
        FederatedConfig.from_file(tmp_path / "ints.yaml")


def test_a_split_with_more_clients_than_examples_is_refused_up_front():
    labels = np.repeat(np.arange(2), 4)  # 8 examples
    with pytest.raises(ConfigError, match=r"num_clients=9 is more than the 8 training examples"):
        partition(labels, 9, ("iid", None), seed=0)
    with pytest.raises(ConfigError, match=r"num_clients=9"):
        partition(labels, 9, ("pathological", 1), seed=0)
    parts = partition(labels, 8, ("iid", None), seed=0)  # the boundary: one example each
    assert [len(p) for p in parts] == [1] * 8
