"""Human memory units: ``parse_bytes("6GiB")`` and ``format_bytes(6 * 2**30)``.

Decimal prefixes are powers of 1000 (``KB``, ``MB``, ``GB``, ``TB``), binary prefixes powers of 1024 (``KiB``,
``MiB``, ``GiB``, ``TiB``), as in IEC 80000-13; the bare letters ``K``/``M``/``G``/``T`` are read as binary
because that is what GPU tools (``nvidia-smi``, PyTorch's allocator stats) print.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from solvers.errors import BudgetParseError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}

_PATTERN = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory amount into bytes.

    Accepts ints (``123``), finite floats (rounded down: a budget must never be overstated), and
    strings such as ``"6GiB"``, ``"512 MiB"``, ``"1.5 GB"``, ``"1e9"``, ``"123"``.

    Raises:
        BudgetParseError: text that is not a number with a known unit, NaN/inf, or a negative amount;
            the message quotes the text.
    """
    if isinstance(text, bool):  # bool is an int subclass; True bytes is surely a mistake
        raise BudgetParseError(f"memory amount {text!r} is not a number of bytes")
    if isinstance(text, int):
        if text < 0:
            raise BudgetParseError(f"memory amount {text!r} is negative")
        return int(text)
    if isinstance(text, float):
        if not math.isfinite(text):  # NaN or inf
            raise BudgetParseError(f"memory amount {text!r} is not finite")
        if text < 0:
            raise BudgetParseError(f"memory amount {text!r} is negative")
        return int(math.floor(text))
    if not isinstance(text, str):
        raise BudgetParseError(f"memory amount {text!r} has type {type(text).__name__}, expected str, int or float")
    match = _PATTERN.match(text)
    if match is None:
        raise BudgetParseError(f"cannot parse memory amount {text!r} (expected e.g. '6GiB', '512MiB', '1.5 GB', '1e9')")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise BudgetParseError(
            f"unknown unit {unit!r} in memory amount {text!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
        )
    value = float(number)
    if not math.isfinite(value):
        raise BudgetParseError(f"memory amount {text!r} is not finite")
    if value < 0:
        raise BudgetParseError(f"memory amount {text!r} is negative")
    # Integers without a fractional part are parsed exactly (no float rounding for "123456789012345").
    if re.fullmatch(r"\+?\d+", number):
        return int(number) * factor
    nbytes = value * factor
    if not math.isfinite(nbytes):  # 1e308TiB: a finite number times the unit overflows a float
        raise BudgetParseError(f"memory amount {text!r} is too large (over {format_bytes(2**63)})")
    return int(math.floor(nbytes))


def format_bytes(n: int) -> str:
    """Format bytes with a binary prefix and one decimal, e.g. ``1288490188 -> '1.2 GiB'``."""
    n = int(n)
    sign = "-" if n < 0 else ""
    m = abs(n)
    if m < 1024:
        return f"{sign}{m} B"
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if m >= factor:
            return f"{sign}{m / factor:.1f} {unit}"
    return f"{sign}{m} B"  # unreachable


_HEADER_IDS = ("client", "client_id", "id")


def read_budget_csv(path: str | Path) -> dict[int, int]:
    """``client,budget`` rows of a CSV file -> ``{client id: bytes}``, ids kept as written (0,5,9 stay 0,5,9).

    A header row (first cell ``client``, ``client_id`` or ``id``) and blank lines are skipped; budgets are in
    human units (`parse_bytes`). The one parser of budget files, shared by ``fedkernels plan`` and the
    trainer (``FederatedConfig.budgets_file``).

    Raises:
        BudgetParseError: a missing or unreadable file, a short row, a non-integer or negative id, a bad
            budget, or a duplicate id; the message names the file, the line and the offending value.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BudgetParseError(f"budgets file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetParseError(f"budgets file {str(path)!r} cannot be read: {exc}") from None
    out: dict[int, int] = {}
    first_line: dict[int, int] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip() or row[0].strip().lower() in _HEADER_IDS:
            continue
        if len(row) < 2:
            raise BudgetParseError(f"{path}:{lineno}: expected 'client,budget', got {row!r}")
        try:
            cid = int(row[0])
        except ValueError:
            raise BudgetParseError(f"{path}:{lineno}: client id must be an integer, got {row[0]!r}") from None
        if cid < 0:
            raise BudgetParseError(f"{path}:{lineno}: client id must be >= 0, got {cid}")
        if cid in out:
            raise BudgetParseError(f"{path}:{lineno}: duplicate client id {cid} (first given on line "
                                   f"{first_line[cid]})")
        try:
            out[cid] = parse_bytes(row[1].strip())
        except BudgetParseError as exc:
            raise BudgetParseError(f"{path}:{lineno}: client {cid}: {exc}") from None
        first_line[cid] = lineno
    if not out:
        raise BudgetParseError(f"budgets file {str(path)!r} has no 'client,budget' rows")
    return out
