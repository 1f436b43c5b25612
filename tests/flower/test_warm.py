"""`PollingGrid`: replies are collected across polls, the wait ends as soon as all came back or at the timeout."""

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from fedkernels.flower.warm import PollingGrid  # noqa: E402


class SlowGrid:
    """Replies to message i become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if now >= self.delays[int(i[1:])]]

    def get_node_ids(self):
        return [7]


def test_collects_every_reply_soon_after_the_last_arrives():
    grid = PollingGrid(SlowGrid([0.0, 0.15, 0.3]), poll_s=0.02)
    t = time.monotonic()
    got = grid.send_and_receive(["a", "b", "c"], timeout=10)
    took = time.monotonic() - t
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1", "m2"]
    assert 0.3 <= took < 1.0  # Flower's own grid sleeps 3 s between polls
    assert grid.get_node_ids() == [7]  # everything else is the wrapped grid's


def test_stops_at_the_timeout_with_the_replies_it_has():
    grid = PollingGrid(SlowGrid([0.0, 60.0]), poll_s=0.02)
    t = time.monotonic()
    got = grid.send_and_receive(["a", "b"], timeout=0.2)
    assert [m.metadata.reply_to_message_id for m in got] == ["m0"]
    assert time.monotonic() - t < 1.0
