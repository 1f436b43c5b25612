"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

With Flower's default ``subprocess`` isolation, the SuperNode's SuperExec starts a fresh ``flwr-clientapp``
process for every message: it imports torch and transformers and rebuilds the model each time, 8-9 s per
message on a 2-core machine for a model that trains in under 1 s (examples/flower/results/). In ``process``
isolation the SuperNode only serves its Runtime API and waits for someone to claim its tasks; this module is that
someone. It claims each ClientApp task with the same ``AcquireTask`` call SuperExec makes, and runs it in this
process with the same ``pull_task_input`` / ``push_message`` / ``push_task_output`` steps as ``flwr-clientapp``.
So the installed app, the loaded ``ClientApp`` and `fedkernels.flower.client`'s prepared-model cache live as long
as the process.

    python -m fedkernels.flower.warm --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["WarmClientApp", "PollingGrid", "main"]

log = logging.getLogger("fedkernels.flower")

# An object of a message is pulled from the SuperNode, which may still be fetching it from the SuperLink when we
# claim the task; Flower retries after 1 s, then 2 s, 4 s... (PULL_INITIAL_BACKOFF, supercore/constant.py), which
# measured 1.2-3.7 s of a 4 s task. Retrying after 50 ms, doubling up to 0.5 s, finds it as soon as it lands.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5

# A ServerApp's `Grid.send_and_receive` sleeps 3 s between reply polls (flwr 1.42 http_grid.py): with replies
# ready after 0.3 s of training, a round waits 3 s for nothing. 50 ms keeps that wait at a few percent.
SERVER_POLL_S = 0.1

# 200 ms between polls when idle: a message waits 0.1 s on average instead of SuperExec's 0.5 s (1 s default
# interval). Not less: each poll is an HTTP call the SuperNode serves, and 3 nodes polling every 20 ms kept a
# 2-core machine busy enough to slow the round down (measured 11.8 s vs 8.5 s at 20 ms on a loaded machine)
POLL_S = 0.2


class WarmClientApp:
    """Claims the ClientApp tasks of one SuperNode's Runtime API and runs them in this process.

    Args:
        runtime_api_address: ``host:port`` of the SuperNode's Runtime API (its ``--port``).
        poll_s: seconds between ``AcquireTask`` polls while idle.
    """

    def __init__(self, runtime_api_address: str, *, poll_s: float = POLL_S) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        self.poll_s = float(poll_s)
        self._apps: dict[str, object] = {}  # FAB hash -> loaded ClientApp (installed once per app version)
        self._acquire = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.tasks_run = 0
        self.last_timings: dict[str, float] = {}  # seconds per step of the last task: pull, app, push

    def poll_once(self) -> bool:
        """Claim and run one pending ClientApp task; False when there was none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                           agentapp_fab_hashes=[]))
        if not (res.HasField("task") and res.token):
            return False
        t = time.perf_counter()
        self.run_task(res.token)
        log.info("task %d (run %d) done in %.2fs (%s)", res.task.task_id, res.task.run_id, time.perf_counter() - t,
                 ", ".join(f"{k} {v:.2f}s" for k, v in self.last_timings.items()))
        self.tasks_run += 1
        return True

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll and run tasks until killed (or until ``max_tasks`` ran)."""
        while max_tasks is None or self.tasks_run < max_tasks:
            if not self.poll_once():
                time.sleep(self.poll_s)

    def _client_app(self, run, fab):
        """The ClientApp of this FAB, installed into FLWR_HOME and imported on first use only."""
        app = self._apps.get(fab.hash_str)
        if app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            self._apps[fab.hash_str] = app
        return app

    def run_task(self, token: str) -> None:
        """One task, as ``flwr-clientapp --token`` runs it, except that an exception becomes an error reply and
        the process stays up for the next task."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry,
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        times = self.last_timings = {}
        t = time.perf_counter()
        try:
            heartbeat.start()
            message, context, run, fab = _pull_task_input(client)
            times["pull"], t = time.perf_counter() - t, time.perf_counter()
            reply = self._client_app(run, fab)(message=message, context=context)
            times["app"], t = time.perf_counter() - t, time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - reported to the server as the message's error reply
            log.exception("ClientApp task raised")
            details = f"{type(exc)}:<'{exc}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - the server counts the node as silent; the next task may work
                log.exception("pushing the reply failed")
            retry.max_tries = 1  # as flwr-clientapp's exit handler: do not block on the final status
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            times["push"] = time.perf_counter() - t


def _pull_task_input(client):
    """Flower's ``pull_task_input`` (flwr/supernode/runtime/run_clientapp.py), with the short pull backoff."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("no message received from the SuperNode's Runtime API")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S,
        max_tries_per_object=None)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its own id
    return message, context, run, fab


class PollingGrid:
    """A ServerApp's grid whose `send_and_receive` polls for replies every ``poll_s`` instead of every 3 s;
    every other attribute is the wrapped grid's."""

    def __init__(self, grid, poll_s: float = SERVER_POLL_S) -> None:
        self._grid = grid
        self.poll_s = float(poll_s)
        # The replies' objects are pulled by http_grid with Flower's 1 s initial backoff: shorten it (another
        # Flower layout without that module keeps its own waits).
        with contextlib.suppress(ImportError):
            from flwr.superlink.grid import http_grid

            from fedkernels.flower.fastnode import short_pull

            short_pull(http_grid)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        """Push ``messages``, then pull replies until all came back or ``timeout`` seconds passed."""
        ids = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        out: list = []
        while ids:
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return out


def _watch_parent(pid: int) -> None:
    """Exit when ``pid`` (the SuperNode) is gone, like ``flwr-clientapp --parent-pid``."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedkernels.flower.warm", description=__doc__.split("\n")[0])
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between polls while idle")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP call: 50 a second while idle
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid)
    # import torch, transformers and the app's modules now, while the SuperNode connects, not in the first task
    import fedkernels.flower.client  # noqa: F401

    worker = WarmClientApp(args.runtime_api_address, poll_s=args.poll)
    # wait for the SuperNode's Runtime API: it starts listening a moment after the process starts
    deadline = time.monotonic() + 120
    while True:
        try:
            worker.poll_once()
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    log.info("warm ClientApp serving %s (pid %d, cwd %s)", args.runtime_api_address, os.getpid(), Path.cwd())
    worker.serve()


if __name__ == "__main__":
    main()
