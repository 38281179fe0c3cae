"""`switchgear tasks submit|get|list|cancel|watch|stats`: a thin client of TasksService.

The main CLI registers this group with `add_parser(sub)`; each command parses, calls one RPC
and prints (tables for a task, lists and stats, `--json` for machines; a live progress display
for watch). Commands send the admin token or a tenant's client key (`--api-key`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from switchgear import cli_output
from switchgear.admin_client import admin_channel, resolve_credential
from switchgear.v1 import tasks_pb2, tasks_pb2_grpc

STATES = [name.removeprefix("TASK_STATE_").lower() for name in tasks_pb2.TaskState.keys()][1:]  # noqa: SIM118
FINAL = {"succeeded", "failed", "cancelled", "dead_lettered"}
INLINE_LIMIT = 1024 * 1024
CHUNK = 256 * 1024


def _state(value: int) -> str:
    return str(tasks_pb2.TaskState.Name(value)).removeprefix("TASK_STATE_").lower()


def _print(message: Any) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _upload(stub: tasks_pb2_grpc.TasksServiceStub, data: bytes, timeout: float) -> str:
    def chunks() -> Iterable[tasks_pb2.UploadBlobRequest]:
        yield tasks_pb2.UploadBlobRequest(content_type="application/json", chunk=data[:CHUNK])
        for start in range(CHUNK, len(data), CHUNK):
            yield tasks_pb2.UploadBlobRequest(chunk=data[start:start + CHUNK])

    return str(stub.UploadBlob(chunks(), timeout=timeout).blob_id)


def _submit(stub: tasks_pb2_grpc.TasksServiceStub, args: argparse.Namespace) -> int:
    data = Path(args.payload_file).read_bytes() if args.payload_file else args.payload.encode()
    request = tasks_pb2.SubmitTaskRequest(
        service=args.service, method=args.method, priority=args.priority, idempotency_key=args.idempotency_key,
        tenant=args.tenant, max_attempts=args.max_attempts,
    )
    if len(data) > INLINE_LIMIT or args.blob:
        request.payload_blob_id = _upload(stub, data, args.timeout)
    else:
        request.payload = data
    if args.task_timeout:
        request.timeout.FromNanoseconds(round(args.task_timeout * 1e9))
    reply = stub.SubmitTask(request, timeout=args.timeout)
    if args.watch:
        print(f"task {reply.task.id} ({'created' if reply.created else 'existing'})", file=sys.stderr)
        return _watch(stub, [reply.task.id], "", "", sys.stdout)
    _print(reply)
    return 0


def _list(stub: tasks_pb2_grpc.TasksServiceStub, args: argparse.Namespace) -> int:
    states = [tasks_pb2.TaskState.Value(f"TASK_STATE_{s.upper()}") for s in args.state or ()]
    reply = stub.ListTasks(tasks_pb2.ListTasksRequest(states=states, tenant=args.tenant, service=args.service,
                                                      limit=args.limit), timeout=args.timeout)
    if args.json:
        _print(reply)
        return 0
    print(f"{'ID':32}  {'STATE':13}  {'PRI':>3}  {'EFF':>5}  {'TRY':>5}  {'SERVICE':16}  {'TENANT':10}  ERROR")
    for t in reply.tasks:
        print(f"{t.id:32}  {_state(t.state):13}  {t.priority:>3}  {t.effective_priority:>5.2f}  "
              f"{t.attempts:>2}/{t.max_attempts:<2}  {t.service:16}  {t.tenant:10}  {t.error.message[:60]}")
    return 0


def _bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "-" * (width - filled)


def _line(t: tasks_pb2.Task) -> str:
    state = _state(t.state)
    progress = 1.0 if state == "succeeded" else t.progress
    if state == "succeeded":
        detail = f"served by endpoint {t.endpoint}" if t.endpoint else ""
    else:
        detail = t.error.message if state in FINAL else t.progress_message
    agent = f" @{t.agent}" if t.agent else ""
    return (f"{t.id[:12]}  {state:13} [{_bar(progress)}] {progress * 100:5.1f}%  "
            f"try {t.attempts}/{t.max_attempts}{agent}  {detail}")


def _watch(stub: tasks_pb2_grpc.TasksServiceStub, ids: list[str], tenant: str, service: str, out: TextIO) -> int:
    """Live display: on a terminal one redrawn line per task; otherwise one line per change."""
    live = out.isatty() and bool(ids)
    lines: dict[str, str] = {}
    final_states: dict[str, str] = {}
    printed = 0
    stream = stub.WatchTasks(tasks_pb2.WatchTasksRequest(ids=ids, tenant=tenant, service=service))
    try:
        for event in stream:
            t = event.task
            lines[t.id] = _line(t)
            if _state(t.state) in FINAL:
                final_states[t.id] = _state(t.state)
            if live:  # go back to the first line drawn, redraw every task's line
                out.write(f"\x1b[{printed - 1}F" if printed > 1 else "\r")
                out.write("\n".join(f"{v}\x1b[K" for v in lines.values()))
                out.flush()
                printed = len(lines)
            else:
                out.write(f"{time.strftime('%H:%M:%S')}  {lines[t.id]}\n")
                out.flush()
    except KeyboardInterrupt:
        stream.cancel()
    if live:
        out.write("\n")
    return 0 if ids and all(final_states.get(i) == "succeeded" for i in ids) else (1 if ids else 0)


def _show_task(reply: Any, as_json: bool) -> None:
    if as_json:
        _print(reply)
    else:
        cli_output.print_table(cli_output.task_rows(reply.task))


def _stats(reply: tasks_pb2.GetTaskStatsResponse, as_json: bool) -> None:
    if as_json:
        _print(reply)
        return
    print(cli_output.task_counts_line(reply))
    cli_output.print_table(cli_output.task_stats_rows(reply))


def run(args: argparse.Namespace) -> int:
    """Each command with the caller's credential: --api-key, else the admin token (--admin-token-file,
    $SWITCHGEAR_ADMIN_TOKEN), else $SWITCHGEAR_API_KEY (see admin_client.resolve_credential)."""
    try:
        credential = resolve_credential(args.admin_token_file, args.api_key)
    except OSError as exc:
        print(f"switchgear tasks: --admin-token-file: {exc}", file=sys.stderr)
        return 1
    with admin_channel(args.control_plane, credential) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        try:
            command = args.tasks_command
            if command == "submit":
                return _submit(stub, args)
            if command == "list":
                return _list(stub, args)
            if command == "watch":
                return _watch(stub, args.ids, args.tenant, args.service, sys.stdout)
            if command == "get":
                _show_task(stub.GetTask(tasks_pb2.GetTaskRequest(id=args.id), timeout=args.timeout), args.json)
            elif command == "cancel":
                _show_task(stub.CancelTask(tasks_pb2.CancelTaskRequest(id=args.id), timeout=args.timeout), args.json)
            elif command == "stats":
                _stats(stub.GetTaskStats(tasks_pb2.GetTaskStatsRequest(), timeout=args.timeout), args.json)
            return 0
        except grpc.RpcError as exc:
            print(cli_output.rpc_failure(exc, cli_output.TASKS, args.control_plane, "switchgear tasks list"),
                  file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"switchgear tasks: {exc}", file=sys.stderr)
            return 1


def add_parser(sub: Any) -> None:
    tasks = sub.add_parser("tasks", help="submit and follow long-running tasks (TasksService)")
    tasks.add_argument("--control-plane", default="127.0.0.1:50051")
    tasks.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    who = tasks.add_mutually_exclusive_group()
    who.add_argument("--admin-token-file", help="file holding the admin token (else $SWITCHGEAR_ADMIN_TOKEN)")
    who.add_argument("--api-key", default="",
                     help="a tenant's client key: its own tasks only (else $SWITCHGEAR_API_KEY when no admin "
                          "token is given)")
    group = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")

    submit = group.add_parser("submit", help="queue a task")
    submit.add_argument("--service", required=True)
    submit.add_argument("--method", default="chat.completions")
    body = submit.add_mutually_exclusive_group(required=True)
    body.add_argument("--payload", help="JSON object")
    body.add_argument("--payload-file", help="file holding the JSON object (uploaded as a blob when large)")
    submit.add_argument("--blob", action="store_true", help="always upload the payload as a blob")
    submit.add_argument("--priority", type=int, default=0, help="1..10 (default 5)")
    submit.add_argument("--task-timeout", type=float, default=0.0, help="per-attempt budget in seconds")
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--tenant", default="")
    submit.add_argument("--max-attempts", type=int, default=0)
    submit.add_argument("--watch", action="store_true", help="then follow it until it is final")

    for name, text in (("get", "show one task"), ("cancel", "cancel a task that is not final")):
        p = group.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--json", action="store_true", help="print the reply as JSON (payload and result too)")
    listing = group.add_parser("list", help="list tasks, newest first")
    listing.add_argument("--state", action="append", choices=STATES)
    listing.add_argument("--tenant", default="")
    listing.add_argument("--service", default="")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print the reply as JSON")
    watch = group.add_parser("watch", help="follow tasks live (all tasks when no id is given)")
    watch.add_argument("ids", nargs="*")
    watch.add_argument("--tenant", default="")
    watch.add_argument("--service", default="")
    stats = group.add_parser("stats", help="queue counts and resource utilisation")
    stats.add_argument("--json", action="store_true", help="print the reply as JSON")
    tasks.set_defaults(func=run)
