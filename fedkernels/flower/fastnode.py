"""``flower-supernode`` with short polling waits, for the loopback deployment (`LocalDeployment`).

flwr 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s whenever a poll of the
SuperLink finds no message, and 0.5 s between checks for a finished reply. On one machine, where a round of the
tiny test config trains in under 1 s, those waits were most of a warm loopback round (5.5-7.4 s measured with
the long-lived ClientApp of `fedkernels.flower.warm`). This entry point runs Flower's own SuperNode unchanged
except that the sleeps of that one module are capped at `POLL_CAP_S` and its object pulls retry after
50 ms instead of 1 s (`short_pull`): the node then asks the SuperLink every
0.2 s, i.e. 5 loopback HTTP requests a second per idle node. Nothing else in the process is affected (the
module's ``time`` is replaced by a copy whose ``sleep`` is capped; the global ``time.sleep`` is untouched).

Used only by `LocalDeployment` (loopback, one machine); real deployments run Flower's ``flower-supernode``.
"""

from __future__ import annotations

import functools
import sys
import time
import types

POLL_CAP_S = 0.2
# Flower pulls a message's objects with retries starting at 1 s and doubling (flwr/supercore/constant.py
# PULL_INITIAL_BACKOFF = 1): an object pushed 10 ms after the first try costs a whole second. 50 ms, capped at 0.5 s.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5


def short_pull(module: types.ModuleType) -> None:
    """Give ``module``'s ``pull_objects`` (imported by name from flwr's inflatable utils) the short backoff."""
    pull = getattr(module, "pull_objects", None)
    if pull is not None and not isinstance(pull, functools.partial):
        module.pull_objects = functools.partial(pull, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)


def _capped_time(cap_s: float) -> types.SimpleNamespace:
    names = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    names["sleep"] = lambda seconds: time.sleep(min(float(seconds), cap_s))
    return types.SimpleNamespace(**names)


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not hasattr(start_client_internal, "time"):  # a Flower whose loop no longer uses time.sleep: run it as is
        return flower_supernode()
    start_client_internal.time = _capped_time(POLL_CAP_S)
    short_pull(start_client_internal)
    return flower_supernode()


if __name__ == "__main__":
    sys.argv[0] = "flower-supernode"
    sys.exit(main())
