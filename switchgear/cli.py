"""The `switchgear` command: parses arguments and calls into a plane. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from switchgear import __version__


def _ready_announcer(ready_file: str | None) -> Callable[[str], None]:
    """Tell a supervising process where we listen: a `READY addr` stdout line, and a file."""

    def announce(address: str) -> None:
        print(f"READY {address}", flush=True)
        if ready_file:
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(address, encoding="utf-8")
            tmp.replace(ready_file)

    return announce


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request INFO lines


def cmd_controlplane(args: argparse.Namespace) -> int:
    from switchgear.controlplane.server import Options, StartupError, serve

    _logging(args.log_level)
    options = Options(db_path=args.db, listen=args.listen, config_path=args.config)

    async def run() -> None:
        await serve(options, _signal_event(), _ready_announcer(args.ready_file))

    try:
        asyncio.run(run())
    except StartupError as exc:
        print(f"switchgear controlplane: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from switchgear.dataplane.server import Options, serve

    _logging(args.log_level)
    options = Options(
        control_planes=[a.strip() for a in args.control_plane.split(",") if a.strip()],
        listen=args.listen, node_id=args.node_id, zone=args.zone,
    )

    async def run() -> None:
        await serve(options, _signal_event(), _ready_announcer(args.ready_file))

    asyncio.run(run())
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from switchgear.controlplane.config import ConfigError, describe, load_config_file

    try:
        state = load_config_file(args.file, env=os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid; it would register {len(state.services)} service(s)")
    print(describe(state))
    return 0


def _admin_call(args: argparse.Namespace, method: str, request: object) -> object:
    from switchgear.v1 import admin_pb2_grpc

    with grpc.insecure_channel(args.control_plane) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        return getattr(stub, method)(request, timeout=args.timeout)


def _print_message(message: object) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def cmd_admin(args: argparse.Namespace) -> int:
    from switchgear.v1 import admin_pb2, common_pb2

    requests: dict[str, Callable[[], tuple[str, object]]] = {
        "services": lambda: ("ListServices", admin_pb2.ListServicesRequest()),
        "get": lambda: ("GetService", admin_pb2.GetServiceRequest(name=args.name)),
        "deregister": lambda: ("DeregisterService", admin_pb2.DeregisterServiceRequest(name=args.name)),
        "agents": lambda: ("ListAgents", admin_pb2.ListAgentsRequest()),
        "snapshot": lambda: ("GetSnapshot", admin_pb2.GetSnapshotRequest()),
        "apply": lambda: (
            "ApplyConfig",
            admin_pb2.ApplyConfigRequest(
                yaml=Path(args.file).read_text(encoding="utf-8"), source=args.file, dry_run=args.dry_run
            ),
        ),
        "register": lambda: (
            "RegisterService",
            admin_pb2.RegisterServiceRequest(
                service=json_format.Parse(Path(args.file).read_text(encoding="utf-8"), common_pb2.Service())
            ),
        ),
    }
    try:
        method, request = requests[args.admin_command]()
        _print_message(_admin_call(args, method, request))
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, json_format.ParseError) as exc:
        print(f"switchgear admin: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    from google.protobuf import duration_pb2

    from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.InvokeRequest(
        service=args.service, method=args.method, payload=args.payload.encode(),
        priority=args.priority, user_id=args.user_id,
    )
    if args.deadline:
        request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(args.deadline), nanos=int(args.deadline % 1 * 1e9)))
    with grpc.insecure_channel(args.agent) as channel:
        try:
            response = gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    summary = gateway_pb2.InvokeResponse()
    summary.CopyFrom(response)
    summary.ClearField("payload")
    _print_message(summary)
    print(response.payload.decode())
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from switchgear.emulators import openai as emulator

    kinds = {"openai": emulator.main}
    if not args.emulator_args or args.emulator_args[0] not in kinds:
        print(f"usage: switchgear emulate {{{','.join(kinds)}}} [options]", file=sys.stderr)
        return 2
    return kinds[args.emulator_args[0]](args.emulator_args[1:])


def cmd_demo(args: argparse.Namespace) -> int:
    from switchgear import demo

    return demo.main(requests=args.requests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchgear",
        description="Switchgear: a gRPC control plane and data-plane agents for AI applications' external services.",
    )
    parser.add_argument("--version", action="version", version=f"switchgear {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cp = sub.add_parser("controlplane", help="run the control plane (registry, snapshots, admin)")
    cp.add_argument("--config", help="YAML config applied at start-up when it changed since last applied")
    cp.add_argument("--db", default="switchgear.db", help="SQLite file for the registry (default: %(default)s)")
    cp.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address (port 0 picks one)")
    cp.add_argument("--ready-file", help="write the listening address here once ready")
    cp.add_argument("--log-level", default="info")
    cp.set_defaults(func=cmd_controlplane)

    ag = sub.add_parser("agent", help="run a data-plane agent (Gateway service)")
    ag.add_argument("--control-plane", required=True, help="control-plane address(es), comma separated")
    ag.add_argument("--listen", default="127.0.0.1:50061", help="gRPC address (port 0 picks one)")
    ag.add_argument("--node-id", default="", help="stable agent identity (default: host and pid)")
    ag.add_argument("--zone", default="")
    ag.add_argument("--ready-file", help="write the listening address here once ready")
    ag.add_argument("--log-level", default="info")
    ag.set_defaults(func=cmd_agent)

    cfg = sub.add_parser("config", help="work with config files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    val = cfg_sub.add_parser("validate", help="print what is wrong, or what would be registered")
    val.add_argument("file")
    val.set_defaults(func=cmd_config_validate)

    adm = sub.add_parser("admin", help="call the control plane's Admin service")
    adm.add_argument("--control-plane", default="127.0.0.1:50051")
    adm.add_argument("--timeout", type=float, default=10.0, help="seconds")
    adm_sub = adm.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    adm_sub.add_parser("services", help="list services")
    adm_sub.add_parser("agents", help="list agents and the versions they ACKed or NACKed")
    adm_sub.add_parser("snapshot", help="show the snapshot being served")
    for name, help_text in (("get", "show one service"), ("deregister", "remove a service")):
        p = adm_sub.add_parser(name, help=help_text)
        p.add_argument("name")
    apply = adm_sub.add_parser("apply", help="replace the registry with a config file's content")
    apply.add_argument("file")
    apply.add_argument("--dry-run", action="store_true")
    reg = adm_sub.add_parser("register", help="create or replace one service from a JSON file (switchgear.v1.Service)")
    reg.add_argument("file")
    adm.set_defaults(func=cmd_admin)

    inv = sub.add_parser("invoke", help="call Gateway.Invoke on an agent")
    inv.add_argument("--agent", default="127.0.0.1:50061")
    inv.add_argument("--service", required=True)
    inv.add_argument("--method", default="chat.completions")
    inv.add_argument("--payload", required=True, help="JSON object")
    inv.add_argument("--priority", type=int, default=0)
    inv.add_argument("--user-id", default="")
    inv.add_argument("--deadline", type=float, default=0.0, help="request budget in seconds")
    inv.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline in seconds")
    inv.set_defaults(func=cmd_invoke)

    emu = sub.add_parser("emulate", help="run protocol-faithful upstream emulators (openai)", add_help=False)
    emu.add_argument("emulator_args", nargs=argparse.REMAINDER)
    emu.set_defaults(func=cmd_emulate)

    demo = sub.add_parser("demo", help="run the end-to-end demo (no keys, no external servers)")
    demo.add_argument("--requests", type=int, default=120)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
