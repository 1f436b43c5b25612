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
