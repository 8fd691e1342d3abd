"""The merchant's long-running ClientApp runner: answers only runs of an app it pinned.

``fedshop client`` starts Flower's SuperNode with ``--isolation process``, so the SuperNode
starts no ClientApp of its own: it only queues each message as a task on its local Runtime
API (127.0.0.1). This runner claims those tasks one at a time. For each it reads the run's
app bundle, computes its app hash (:mod:`simulations.deployment.pinning`) and

* if the hash is pinned, hands the message to the ClientApp loaded once at start from the
  merchant's own installed app (so torch and Opacus stay imported between messages);
* otherwise refuses: nothing from the bundle is installed, imported or run, the merchant's
  log gets one line saying so, and the platform gets an error reply naming the merchant.

Each claimed task gets a thread of its own and ClientApp calls are serialised. Flower 1.41's
SuperNode can leave a task behind for a message of a run that ended while it was being
received; that task's message never arrives, and a runner serving tasks one at a time would
wait on it instead of answering the next run (the SuperNode waits for that answer before it
pulls anything else).

The bundle's code never runs here, pinned or not: a pinned hash only says that the platform
runs the same app the merchant installed.

Run as ``python -m simulations.deployment.runner --runtime-api 127.0.0.1:PORT --app DIR
--merchant-config merchant.toml``; ``fedshop client`` does this.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors.http import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from common.errors import DeploymentError
from common.flower_waits import LOOPBACK_RETRIES
from simulations.deployment.pinning import (
    PinnedApps,
    bundle_app_hash,
    clientapp_reference,
    extra_app_hashes,
    local_app_hash,
)

log = logging.getLogger("fedshop.runner")

COMPONENT = "flwr-clientapp"
POLL_S = 0.1  # how often an idle runner asks the SuperNode for a task (loopback, cheap)
UNAVAILABLE_WARN_S = 30.0
MESSAGE_PULL_MAX_S = 1800.0  # a message whose parts never reach the SuperNode is given up
REFUSAL_MARK = "refuses app bundle"
READY_MARK = "ClientApp runner ready"
_RETRY_TIME_S = 30.0
_TRANSIENT = (
    httpx.ConnectError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.PoolTimeout,
)


def _retry_invoker(max_time: float) -> RetryInvoker:
    """Retry only connection hiccups, for at most ``max_time``; an HTTP error is final.

    Flower's own invoker signals its process to exit on some answers, which suits a
    one-message ClientApp process but not a runner that serves many tasks.
    """
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=_TRANSIENT,
        max_tries=None if max_time > 0 else 1,
        max_time=max_time if max_time > 0 else None,
    )


def _client(address: str, *, token: str | None) -> RuntimeHttpClient:
    """A Runtime API client; the task-less one (claiming tasks) never retries by itself."""
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=_retry_invoker(_RETRY_TIME_S if token is not None else 0.0),
    )


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task, for the log and the tests."""

    run_id: int
    app_hash: str
    answered: bool
    detail: str = ""


class ClientAppRunner:
    """Claims ClientApp tasks from a SuperNode and answers them with the pinned ClientApp."""

    def __init__(
        self,
        runtime_api: str,
        *,
        pinned: PinnedApps,
        client_app: ClientApp,
        merchant_id: str,
    ) -> None:
        self.runtime_api = runtime_api
        self.pinned = pinned
        self.client_app = client_app
        self.merchant_id = merchant_id
        self._stop = threading.Event()
        self._app_lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()

    def serve(self, on_task: Callable[[TaskOutcome], None] | None = None) -> None:
        """Claim and answer tasks until :meth:`stop`."""
        acquirer = _client(self.runtime_api, token=None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        unavailable_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    response = acquirer.AcquireTask(request)
                    unavailable_since = None
                except httpx.HTTPError as exc:
                    # The SuperNode starts beside us and restarts on its own; say so only
                    # when it stays away.
                    now = time.monotonic()
                    if unavailable_since is None:
                        unavailable_since = now
                    elif now - unavailable_since > UNAVAILABLE_WARN_S:
                        log.warning("SuperNode Runtime API unavailable for 30 s (%s)", exc)
                        unavailable_since = now
                    self._stop.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    threading.Thread(
                        target=self._task_thread,
                        args=(response.token, on_task),
                        name=f"task-{response.task.task_id}",
                        daemon=True,
                    ).start()
                else:
                    self._stop.wait(POLL_S)
        finally:
            acquirer.close()

    def _task_thread(self, token: str, on_task: Callable[[TaskOutcome], None] | None) -> None:
        try:
            outcome = self.run_task(token)
        except Exception:  # a broken task must not take the runner down
            log.exception("a task could not be completed")
            return
        if on_task is not None:
            on_task(outcome)

    def run_task(self, token: str) -> TaskOutcome:
        """Pull one task's input, check its app hash, answer it, report its end."""
        client = _client(self.runtime_api, token=token)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        try:
            return self._run_task(client)
        finally:
            heartbeat.stop()
            client.close()

    def _run_task(self, client: RuntimeHttpClient) -> TaskOutcome:
        response = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = response.task_id
        TaskIdentity.run_id = response.run.run_id
        TaskIdentity.node_id = response.context.node_id
        context = context_from_proto(response.context)
        run = run_from_proto(response.run)
        fab = fab_from_proto(response.fab)
        try:
            app_hash = bundle_app_hash(fab.content)
            unreadable = ""
        except DeploymentError as exc:
            app_hash, unreadable = "", str(exc)
        try:
            message = _pull_message(client, context)
        except Exception as exc:
            detail = f"its message could not be received: {type(exc).__name__}: {exc}"
            log.warning("run %d: %s", run.run_id, detail)
            push_task_output(
                client=client, context=None, sub_status=SubStatus.FAILED, details=detail
            )
            return TaskOutcome(run.run_id, app_hash, answered=False, detail=detail)
        if unreadable or not self.pinned.allows(app_hash):
            return self._refuse(client, message, context, app_hash, unreadable)
        return self._answer(client, message, context, run.run_id, app_hash)

    def _refuse(
        self,
        client: RuntimeHttpClient,
        message: Message,
        context: Context,
        app_hash: str,
        unreadable: str,
    ) -> TaskOutcome:
        run_id = context.run_id
        why = unreadable or f"its app hash {app_hash} is not pinned"
        reason = (
            f"merchant {self.merchant_id} {REFUSAL_MARK} of run {run_id}: {why} "
            f"(pinned: {self.pinned.describe()})"
        )
        log.error(
            "REFUSED run %d (%s message): %s; nothing from the bundle was installed or run",
            run_id,
            message.metadata.message_type,
            why,
        )
        reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
        # The run's context goes back untouched: a refused run leaves no state behind.
        _push_reply(client, reply, context, SubStatus.FAILED, reason, keep_context=False)
        return TaskOutcome(run_id, app_hash, answered=False, detail=reason)

    def _answer(
        self,
        client: RuntimeHttpClient,
        message: Message,
        context: Context,
        run_id: int,
        app_hash: str,
    ) -> TaskOutcome:
        began = time.perf_counter()
        try:
            with self._app_lock:
                reply = self.client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the ClientApp's failure goes back to the platform as such
            log.exception("ClientApp raised on run %d", run_id)
            details = f"{type(exc).__name__}: {exc}"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
            status = SubStatus.FAILED
        _push_reply(client, reply, context, status, details)
        log.info(
            "run %d: answered %s message in %.2f s",
            run_id,
            message.metadata.message_type,
            time.perf_counter() - began,
        )
        return TaskOutcome(run_id, app_hash, answered=True, detail=details)


def _pull_message(client: RuntimeHttpClient, context: Context) -> Message:
    """The task's message. The runner claims a task as soon as the SuperNode has the
    message's head, usually before its parts: they are asked for again after 50 ms, backing
    off to 0.5 s (common/flower_waits.py), not after Flower's 1 s to 10 s."""
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        **{**LOOPBACK_RETRIES, "max_time": MESSAGE_PULL_MAX_S},
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message


def _push_reply(
    client: RuntimeHttpClient,
    reply: Message,
    context: Context,
    status: str,
    details: str,
    *,
    keep_context: bool = True,
) -> None:
    try:
        push_message(client, reply, context)
    finally:
        push_task_output(
            client=client,
            context=context if keep_context else None,
            sub_status=status,
            details=details,
        )


def _heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task heartbeat that reports failure instead of interrupting the process."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except httpx.HTTPError:
            return False

    return beat


def load_client_app(app_dir: Path) -> ClientApp:
    """Import the ClientApp of the merchant's installed app once (torch and all)."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.supercore.object_ref import load_app

    reference = clientapp_reference(app_dir)
    app = load_app(reference, LoadClientAppError, app_dir)
    if not isinstance(app, ClientApp):
        raise TypeError(f"{reference} in {app_dir} is not a flwr ClientApp")
    return app


def merchant_id_of(merchant_toml: Path) -> str:
    import tomllib

    with merchant_toml.open("rb") as handle:
        return str(tomllib.load(handle)["merchant"]["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument("--app", type=Path, required=True, help="the pinned app's directory")
    parser.add_argument("--merchant-config", type=Path, required=True, help="merchant.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app_dir = args.app.resolve()
    pinned = PinnedApps(local_app_hash(app_dir), extra_app_hashes(args.merchant_config))
    client_app = load_client_app(app_dir)
    runner = ClientAppRunner(
        args.runtime_api,
        pinned=pinned,
        client_app=client_app,
        merchant_id=merchant_id_of(args.merchant_config),
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("%s; app hash %s; answering %s", READY_MARK, pinned.installed, pinned.describe())
    runner.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
