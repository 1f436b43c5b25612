"""An in-process Flower `Grid` for strategy tests without Ray or sockets: each node runs the real ClientApp."""

from __future__ import annotations

import itertools

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7


def set_task_identity() -> None:
    """Message construction needs the run/task identity a real ServerApp process has."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = 1  # the SuperLink's node id in Flower
    TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    """Nodes ``{node_id: node_config}`` served by ``client_app``; ``down`` nodes never reply; a raising handler
    becomes an error reply, as `flwr-clientapp` does."""

    def __init__(self, client_app, nodes: dict[int, dict]):
        self.client_app = client_app
        self.nodes = nodes
        self.contexts = {n: Context(RUN_ID, n, dict(cfg), RecordDict(), {}) for n, cfg in nodes.items()}
        self.down: set[int] = set()
        self.sent: list[Message] = []
        self._ids = itertools.count(1)

    def set_run(self, run) -> None:  # pragma: no cover - not used in tests
        pass

    @property
    def run(self):  # pragma: no cover - not used in tests
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is overridden
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.down or node not in self.nodes:
                continue
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what flwr-clientapp does with a raising ClientApp
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(reply)
        return replies
