"""The loopback SuperNode's shortened waits (fedkernels.flower.fastnode): capped sleeps, short pull backoff."""

from __future__ import annotations

import functools
import time
import types

import pytest

from fedkernels.flower import fastnode


def test_capped_time_caps_sleep_and_keeps_the_rest_of_time():
    fake = fastnode._capped_time(0.01)
    t = time.perf_counter()
    fake.sleep(3)  # Flower's idle wait: must take the cap, not 3 s
    assert time.perf_counter() - t < 1.0
    assert fake.monotonic is time.monotonic and fake.time is time.time
    assert time.sleep is not fake.sleep  # the real module is untouched


def test_short_pull_binds_the_short_backoff_once():
    seen = {}

    def pull_objects(ids, pull_object_fn, initial_backoff=1.0, backoff_cap=10.0):
        seen.update(initial_backoff=initial_backoff, backoff_cap=backoff_cap)
        return {}

    mod = types.SimpleNamespace(pull_objects=pull_objects)
    fastnode.short_pull(mod)
    fastnode.short_pull(mod)  # idempotent: no partial of a partial
    assert isinstance(mod.pull_objects, functools.partial) and mod.pull_objects.func is pull_objects
    mod.pull_objects([], pull_object_fn=None)
    assert seen == {"initial_backoff": fastnode.PULL_BACKOFF_S, "backoff_cap": fastnode.PULL_BACKOFF_CAP_S}


def test_flower_still_has_the_waits_fastnode_shortens():
    """If Flower renames these, fastnode silently stops helping: fail loudly instead."""
    sci = pytest.importorskip("flwr.supernode.start_client_internal")
    from flwr.superlink.grid import http_grid

    assert hasattr(sci, "time") and hasattr(sci, "pull_objects") and hasattr(http_grid, "pull_objects")
