import pytest

from solvers import BudgetParseError, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("1e9", 1_000_000_000),
        ("123", 123),
        (123, 123),
        (2.9, 2),
        ("7 KB", 7000),
        ("7KiB", 7168),
        ("3g", 3 * 2**30),
        (" 10 b ", 10),
        ("123456789012345678", 123456789012345678),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "6 gigs", "-1GiB", "abc", "1.2.3GB", -5, float("nan"), float("inf"), None, True]
)
def test_parse_bytes_rejects(text):
    with pytest.raises(BudgetParseError) as info:
        parse_bytes(text)
    assert repr(text) in str(info.value) or str(text) in str(info.value)


def test_budget_parse_error_is_value_error():
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (int(1.2 * 2**30), "1.2 GiB"), (3 * 2**40, "3.0 TiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_round_trip_binary_units():
    for n in (5 * 2**20, 7 * 2**30, 3 * 2**10):
        assert parse_bytes(format_bytes(n).replace(" ", "")) == n


@pytest.mark.parametrize("text", ["1e308TiB", "1e400", "nan", "NaN GiB", "-1GiB", "inf", float("nan"), -3])
def test_huge_nan_and_negative_amounts_are_budget_parse_errors(text):
    with pytest.raises(BudgetParseError, match="memory amount"):
        parse_bytes(text)


def test_budget_csv_keeps_ids_and_rejects_duplicates_with_line(tmp_path):
    from solvers.units import read_budget_csv

    good = tmp_path / "b.csv"
    good.write_text("client,budget\n0,1GiB\n5,2GiB\n\n9,512MiB\n")
    assert read_budget_csv(good) == {0: 2**30, 5: 2 * 2**30, 9: 512 * 2**20}
    dup = tmp_path / "d.csv"
    dup.write_text("0,1GiB\n5,2GiB\n0,3GiB\n")
    with pytest.raises(BudgetParseError, match=r"d.csv:3: duplicate client id 0 \(first given on line 1\)"):
        read_budget_csv(dup)
    bad = tmp_path / "x.csv"
    bad.write_text("0,1GiB\n1,1e308TiB\n")
    with pytest.raises(BudgetParseError, match=r"x.csv:2: client 1: .*too large"):
        read_budget_csv(bad)
    with pytest.raises(BudgetParseError, match="does not exist"):
        read_budget_csv(tmp_path / "missing.csv")


def test_os_error_naming_adds_the_path_only_where_none_is_named():
    import errno

    from solvers.errors import os_error_naming

    bare = OSError(errno.ENOSPC, "No space left on device")
    named = os_error_naming(bare, "/runs/x/metrics.jsonl")
    assert named.errno == errno.ENOSPC and named.filename == "/runs/x/metrics.jsonl" and named.__cause__ is bare
    already = FileNotFoundError(errno.ENOENT, "No such file or directory", "budgets.csv")
    assert os_error_naming(already, "other") is already
