"""The `switchgear` command: parses arguments and calls into a plane. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from switchgear import __version__, cli_output
from switchgear.controlplane.grpc_port import GRPC_LIMITS, MAX_CONNECTIONS_DEFAULT
from switchgear.rpc import options as rpc_options
from switchgear.tls import ListenError, ServerTls


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


def _store_url(value: str) -> str:
    """A DSN may hold a password: `env` reads it from $SWITCHGEAR_STORE instead of argv."""
    return os.environ.get("SWITCHGEAR_STORE", "") if value == "env" else value


def cmd_controlplane(args: argparse.Namespace) -> int:
    from switchgear.controlplane.server import Options, StartupError, serve, tune_collector
    from switchgear.tls import ClientTls

    _logging(args.log_level)
    tune_collector()
    overrides = tuple((name, value) for name, value in (
        ("report_interval_s", args.report_interval), ("health_window_s", args.health_window),
        ("alert_window_s", args.alert_window), ("health_debounce_s", args.health_debounce),
    ) if value is not None)
    options = Options(
        db_path=args.db, listen=args.listen, config_path=args.config, metrics_listen=args.metrics_listen,
        monitoring_overrides=overrides, health_blackout_s=args.health_blackout,
        health_min_requests=args.health_min_requests, active_probes=not args.no_probes,
        max_concurrent_pushes=args.max_concurrent_pushes, delta_history=args.delta_history,
        task_lease_ttl_s=args.task_lease_ttl, task_aging_interval_s=args.task_aging_interval,
        admin_auth=args.admin_auth == "token", admin_token_file=args.admin_token_file,
        agent_auth=args.agent_auth == "token", agent_token_file=args.agent_token_file,
        insecure_agents=args.insecure_agents,
        tls=ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        store_url=_store_url(args.store), advertise=args.advertise, replica_id=args.replica_id,
        peer_tls=ClientTls(args.peer_tls_ca, args.tls_cert, args.tls_key) if args.peer_tls_ca else None,
        console=_console_options(args), grpc_server=args.grpc_server,
        grpc_limits=_grpc_limits(args, "switchgear controlplane"),
    )

    async def run() -> None:
        await serve(options, _signal_event(), _ready_announcer(args.ready_file), _announce_metrics,
                    _announce_console)

    try:
        run_event_loop(run())
    except (StartupError, ListenError) as exc:
        print(f"switchgear controlplane: {exc}", file=sys.stderr)
        return 2
    return 0


def _delta_history(text: str) -> int:
    if not text.isdigit() or int(text) > 4096:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 4096, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _json_depth(text: str) -> int:
    """--max-json-depth: 2..128. Deeper payloads would let later recursive steps (the cache key,
    usage estimates) near Python's recursion limit, which is what the limit exists to prevent."""
    if not text.isdigit() or not 2 <= int(text) <= 128:
        raise argparse.ArgumentTypeError(f"must be a whole number from 2 to 128, got {text!r}")
    return int(text)


def _resilience_settings(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from switchgear.dataplane.attempts import ResilienceSettings

    base = ResilienceSettings()
    return replace(base, breaker=replace(base.breaker, base_open_s=args.breaker_open),
                   outlier=replace(base.outlier, base_ejection_s=args.ejection_time))


def _workers_arg(text: str) -> int:
    from switchgear.dataplane.workers import workers_arg

    return workers_arg(text)


def _slice_arg(text: str) -> int:
    from switchgear.dataplane.sched_slice import slice_arg

    return slice_arg(text)


def _burst_order_arg(text: str) -> int:
    from switchgear.dataplane.burst_order import burst_order_arg

    return burst_order_arg(text)


def cmd_agent(args: argparse.Namespace) -> int:
    from switchgear.dataplane import access_log
    from switchgear.dataplane.http_door import door_limits
    from switchgear.dataplane.managed.node import managed_resources
    from switchgear.dataplane.server import Options, agent_token, serve
    from switchgear.dataplane.worker import worker_options
    from switchgear.tls import ClientTls

    _logging(args.log_level)
    try:
        access_log.configure(args.access_log)
        token = agent_token(args.agent_token_file, os.environ)
    except ValueError as exc:
        raise SystemExit(f"switchgear agent: {exc}") from None
    if args.sched_slice_us:  # the kernel must keep it (sched_slice.BusySlice then sets it while calls overlap)
        from switchgear.dataplane import sched_slice

        try:
            sched_slice.apply(args.sched_slice_us)
            sched_slice.apply(0)
        except OSError as exc:
            raise SystemExit(f"switchgear agent: --sched-slice-us {args.sched_slice_us}: {exc}") from None
    if token is None and not args.tls_cert:
        logging.getLogger("switchgear.dataplane").warning(
            "no agent credential (--agent-token-file, $SWITCHGEAR_AGENT_TOKEN or --tls-cert): a control plane "
            "with agent authentication on will refuse this agent")
    options = Options(
        control_planes=[a.strip() for a in args.control_plane.split(",") if a.strip()],
        listen=args.listen, node_id=args.node_id, zone=args.zone, http_listen=args.http_listen,
        http_limits=door_limits(args),
        grpc_server=args.grpc_server, grpc_limits=_grpc_limits(args),
        metrics_listen=args.metrics_listen, otlp_endpoint=args.otlp_endpoint,
        metrics_max_tenants=args.metrics_max_tenants, metrics_max_routes=args.metrics_max_routes,
        trace_sample_ratio=args.trace_sample_ratio, worker=worker_options(args),
        auth_required=args.auth == "api_key", redis_url=args.redis, cache_bytes=args.cache_bytes,
        redis_probe_interval_s=args.redis_probe_interval, redis_write_behind_bytes=args.redis_write_behind_bytes,
        sched_slice_us=args.sched_slice_us, burst_order=args.burst_order,
        max_json_depth=args.max_json_depth,
        resilience=_resilience_settings(args),
        control_plane_tls=ClientTls(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None,
        control_plane_token=token, snapshot_delivery=args.snapshot_delivery, serve_tls=_serve_tls(args),
        managed=managed_resources(args), managed_log_dir=args.managed_log_dir,
        managed_allow=tuple(args.managed_allow), managed_host=args.managed_host,
        managed_docker=args.managed_docker,
    )

    def announce_http(address: str) -> None:
        print(f"HTTP {address}", flush=True)  # after the READY line: supervisors read READY first

    def announce_serving(version: str) -> None:
        print(f"SERVING {version}", flush=True)  # the first snapshot is held: calls are answered from now

    if args.workers > 1:
        if options.managed.cpu > 0:  # each worker would be a node manager of the host's whole offer
            raise SystemExit("--workers N > 1 cannot be combined with --managed-cpu: run managed replicas "
                             "on an agent with --workers 1")
        return _run_workers(options, args, announce_http)

    async def run() -> None:
        await serve(options, _signal_event(), _ready_announcer(args.ready_file), announce_http, _announce_metrics,
                    announce_serving)

    try:
        run_event_loop(run())
    except ListenError as exc:
        print(f"switchgear agent: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_workers(options: Any, args: argparse.Namespace, announce_http: Callable[[str], None]) -> int:
    """--workers N > 1: this process supervises N agent processes (dataplane/workers.py)."""
    from switchgear.dataplane.server import Announce
    from switchgear.dataplane.workers import Supervisor, WorkerFailed

    async def run() -> None:
        announce = Announce(_ready_announcer(args.ready_file), announce_http, _announce_metrics)
        await Supervisor(options, args.workers, args.log_level, args.worker_spread).run(_signal_event(), announce)

    try:
        asyncio.run(run())  # the supervisor only waits on its workers: the default loop will do
    except WorkerFailed as exc:
        raise SystemExit(f"switchgear agent: {exc}") from None
    return 0


def agent_worker() -> None:
    """One process of `agent --workers N`: started by its supervisor, which sends its settings on
    stdin (switchgear/dataplane/workers.py)."""
    from switchgear.dataplane.workers import worker_main

    run_event_loop(worker_main())


def _grpc_limits(args: argparse.Namespace, command: str = "switchgear agent") -> Any:
    try:
        return rpc_options.limits(args)
    except ValueError as exc:
        raise SystemExit(f"{command}: {exc}") from None


def _serve_tls(args: argparse.Namespace) -> ServerTls | None:
    """The agent's application-facing TLS, checked whole before anything starts."""
    given = {"--serve-tls-cert": args.serve_tls_cert, "--serve-tls-key": args.serve_tls_key}
    if not any(given.values()):
        if args.serve_tls_client_ca:
            raise SystemExit("--serve-tls-client-ca needs --serve-tls-cert and --serve-tls-key")
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise SystemExit(f"serving TLS needs {' and '.join(missing)} as well")
    tls = ServerTls(args.serve_tls_cert, args.serve_tls_key, args.serve_tls_client_ca)
    try:
        tls.ssl_context(["h2"])  # unreadable or mismatched files fail here, naming the flag's file
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"--serve-tls-cert/--serve-tls-key/--serve-tls-client-ca: {exc}") from None
    return tls


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop when it is installed (it cuts the agent's per-request CPU, see
    bench/overhead, and the control plane's per-stream cost of a change, bench/controlplane),
    else on the default loop. SWITCHGEAR_EVENT_LOOP=asyncio forces the default."""
    try:
        if os.environ.get("SWITCHGEAR_EVENT_LOOP") == "asyncio":
            raise ImportError("the default loop was asked for")
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _announce_metrics(address: str) -> None:
    print(f"METRICS {address}", flush=True)  # after the READY line: supervisors read READY first


def _announce_console(address: str) -> None:
    print(f"CONSOLE http://{address}/", flush=True)  # after READY (and METRICS)


def _console_options(args: argparse.Namespace) -> Any:
    from switchgear.controlplane.console import ConsoleOptions

    return ConsoleOptions(
        listen=args.console_listen, viewer_token_file=args.console_viewer_token_file,
        session_ttl_s=args.console_session_ttl, max_sessions=args.console_max_sessions,
        max_streams=args.console_max_streams, max_body_bytes=args.console_max_body,
        allow_remote=args.console_insecure_remote, body_timeout_s=args.console_body_timeout,
        max_connections=args.console_max_connections)


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    return parse


def cmd_stats(args: argparse.Namespace) -> int:
    from switchgear.v1 import admin_pb2, common_pb2

    try:
        reply = _admin_call(args, "GetStats", admin_pb2.GetStatsRequest(service=args.service))
    except grpc.RpcError as exc:
        print(cli_output.rpc_failure(exc, cli_output.ADMIN, args.control_plane, "switchgear admin services"),
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"switchgear stats: --admin-token-file: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_message(reply)
        return 0
    window = reply.window.ToNanoseconds() / 1e9  # type: ignore[attr-defined]
    print(f"window {window:g} s, {reply.reporting_agents} reporting agent(s)")  # type: ignore[attr-defined]
    header = ("SERVICE", "ENDPOINT", "HEALTH", "WEIGHT", "REQS", "SUCCESS", "ERRORS", "AVG_MS", "P99_MS",
              "COST/H", "CACHE", "TRIPS", "FAILOVER", "QUEUE", "UTIL", "INFLIGHT")
    rows = [header]
    for st in reply.stats:  # type: ignore[attr-defined]
        health = common_pb2.HealthState.Name(st.health).removeprefix("HEALTH_STATE_").lower() if st.health else ""
        p99 = "inf" if st.p99_response_time_ms < 0 else f"{st.p99_response_time_ms:.0f}"
        rows.append((st.service, st.endpoint or "(total)", health, str(st.weight or ""), str(st.request_count),
                     f"{st.success_rate:.1%}", f"{st.error_rate:.1%}", f"{st.avg_response_time_ms:.1f}", p99,
                     f"{st.cost_per_hour:.4g}", f"{st.cache_hit_rate:.0%}", str(st.circuit_breaker_trips),
                     str(st.failover_count), str(st.queue_length),
                     f"{st.resource_utilization:.0%}" if st.capacity else "-", str(st.in_flight)))
    _print_table(rows)
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from switchgear.v1 import admin_pb2

    try:
        reply = _admin_call(args, "ListAlerts", admin_pb2.ListAlertsRequest(recovered_limit=args.recovered))
    except grpc.RpcError as exc:
        print(cli_output.rpc_failure(exc, cli_output.ADMIN, args.control_plane), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"switchgear alerts: --admin-token-file: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_message(reply)
        return 0
    rows = [("STATE", "RULE", "SERVICE", "SEVERITY", "CONDITION", "VALUE", "ACTION", "DETAIL", "SINCE")]
    for state, alerts in (("firing", reply.firing), ("recovered", reply.recovered)):  # type: ignore[attr-defined]
        for a in alerts:
            since = (a.recovered_at if state == "recovered" else a.fired_at).ToDatetime().strftime("%H:%M:%S")
            rows.append((state, a.rule, a.service, a.severity, a.condition, f"{a.value:.4g}", a.action,
                         a.action_detail, since))
    if len(rows) == 1:
        print("no alerts firing")
        return 0
    _print_table(rows)
    return 0


def cmd_replicas(args: argparse.Namespace) -> int:
    """`switchgear admin replicas`: managed replicas, a failed one's last lines, scaling decisions."""
    from switchgear.v1 import admin_pb2

    reply = _admin_call(args, "ListReplicas", admin_pb2.ListReplicasRequest(service=args.service))
    if args.json:
        _print_message(reply)
        return 0
    rows = [("SERVICE", "REPLICA", "NODE", "STATE", "SERVING", "RESTARTS", "PID", "URL", "MESSAGE")]
    for r in reply.replicas:  # type: ignore[attr-defined]
        state = f"{r.state} (draining)" if r.draining else r.state
        rows.append((r.service, r.id, r.node, state, "yes" if r.serving else "no", str(r.restarts), str(r.pid or ""),
                     r.url, r.message))
    if len(rows) == 1:
        print("no managed replicas")
    else:
        _print_table(rows)
    for r in reply.replicas:  # type: ignore[attr-defined]
        if r.last_log:
            print(f"\nlast lines of {r.id} ({r.service}, {r.state}):")
            print("\n".join(f"  {line}" for line in r.last_log))
    for decision in reply.decisions:  # type: ignore[attr-defined]
        print(f"scaling: {decision}")
    return 0



_print_table = cli_output.print_table


def cmd_config_validate(args: argparse.Namespace) -> int:
    from switchgear.cli_config import describe
    from switchgear.controlplane.agent_check import agent_problems
    from switchgear.controlplane.config import ConfigError, load_config_file

    try:
        state = load_config_file(args.file, env=os.environ, check=agent_problems)
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
    from switchgear.admin_client import admin_channel, resolve_token
    from switchgear.v1 import admin_pb2_grpc

    with admin_channel(args.control_plane, resolve_token(getattr(args, "admin_token_file", None))) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        return getattr(stub, method)(request, timeout=args.timeout)


def _print_message(message: object) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


#: `admin` actions whose reply prints as a table (unless --json): (rows, text when empty).
_ADMIN_TABLES: dict[str, tuple[Callable[[Any], list[tuple[str, ...]]], str]] = {
    "services": (cli_output.services_rows, "no services registered"),
    "agents": (cli_output.agents_rows, "no agents have connected"),
}


def _print_admin_reply(args: argparse.Namespace, reply: Any) -> None:
    """Lists and `get`/`snapshot` as tables (--json: the reply); changes as the reply's JSON."""
    command, as_json = args.admin_command, getattr(args, "json", True)
    if as_json or command not in (*_ADMIN_TABLES, "get", "snapshot"):
        _print_message(reply)
    elif command in _ADMIN_TABLES:
        rows, empty = _ADMIN_TABLES[command]
        cli_output.show(reply, False, rows, empty)
        if command == "services" and reply.rejections:
            print()
            cli_output.print_table(cli_output.rejections_rows(reply))
    elif command == "get":
        cli_output.print_table(cli_output.service_rows(reply))
        print()
        cli_output.print_table(cli_output.endpoint_rows(reply))
    else:
        print("\n".join(cli_output.snapshot_lines(reply)))
        cli_output.show(reply.snapshot, False, cli_output.services_rows, "no services")


def cmd_admin(args: argparse.Namespace) -> int:
    from switchgear import cli_json
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
                service=cli_json.parse(Path(args.file).read_bytes(), common_pb2.Service())
            ),
        ),
    }
    try:
        if args.admin_command == "replicas":
            return cmd_replicas(args)
        method, request = requests[args.admin_command]()
        reply = _admin_call(args, method, request)
        _print_admin_reply(args, reply)
        if getattr(args, "wait", False) and not getattr(args, "dry_run", False):
            return _wait_for_agents(args, str(reply.version))  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        print(cli_output.rpc_failure(exc, cli_output.ADMIN, args.control_plane, "switchgear admin services"),
              file=sys.stderr)
        return 1
    except cli_json.JsonInputError as exc:
        print(f"switchgear admin {args.admin_command}: {args.file}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"switchgear admin: {exc}", file=sys.stderr)
        return 1
    return 0


def _wait_for_agents(args: argparse.Namespace, version: str) -> int:
    """--wait: every connected agent's answer to `version` (see admin_wait.py)."""
    from switchgear import admin_wait
    from switchgear.admin_client import admin_channel, resolve_token
    from switchgear.v1 import admin_pb2, admin_pb2_grpc

    with admin_channel(args.control_plane, resolve_token(args.admin_token_file)) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        code, lines = admin_wait.wait(
            lambda: stub.ListAgents(admin_pb2.ListAgentsRequest(), timeout=args.timeout), version, args.wait_timeout)
    print("\n".join(lines), flush=True)
    return code


def _wait_seconds(text: str) -> float:
    """--wait-timeout: seconds, more than 0 and at most 3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return value


def cmd_invoke(args: argparse.Namespace) -> int:
    from google.protobuf import duration_pb2

    from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.InvokeRequest(
        service=args.service, method=args.method or "chat.completions", payload=args.payload.encode(),
        priority=args.priority, user_id=args.user_id,
    )
    if args.deadline:
        request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(args.deadline), nanos=int(args.deadline % 1 * 1e9)))
    if args.stream:
        return _invoke_stream(args, request)
    with grpc.insecure_channel(args.agent) as channel:
        try:
            response = gateway_pb2_grpc.GatewayServiceStub(channel).Invoke(
                request, timeout=args.timeout, metadata=_client_auth(args))
        except grpc.RpcError as exc:
            print(_invoke_failure(args, exc), file=sys.stderr)
            return 1
    summary = gateway_pb2.InvokeResponse()
    summary.CopyFrom(response)
    summary.ClearField("payload")
    _print_message(summary)
    print(response.payload.decode())
    return 0


def _invoke_failure(args: argparse.Namespace, exc: grpc.RpcError) -> str:
    """The failure with its fix; without --method, what an embedding or other service takes."""
    text = cli_output.rpc_failure(exc, cli_output.AGENT, args.agent, "switchgear admin services")
    code = exc.code()
    if args.method is None and code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE) \
            and not (code == grpc.StatusCode.UNIMPLEMENTED and "method not found" in str(exc.details()).lower()):
        text += ("\n  hint: no --method was given, so chat.completions was sent; an embedding service takes "
                 "--method embeddings (see the service's protocol for others)")
    return text


def _client_auth(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The client key as metadata: --api-key, else $SWITCHGEAR_API_KEY (none: auth-none agents)."""
    key = args.api_key or os.environ.get("SWITCHGEAR_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


def _invoke_stream(args: argparse.Namespace, request: Any) -> int:
    """InvokeStream: one chunk (upstream JSON) per line, then the end message."""
    from switchgear.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(args.agent) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            stream = stub.InvokeStream(gateway_pb2.InvokeStreamRequest(request=request), timeout=args.timeout,
                                       metadata=_client_auth(args))
            for message in stream:
                if message.WhichOneof("event") == "chunk":
                    print(message.chunk.decode(), flush=True)
                else:
                    _print_message(message.end)
        except grpc.RpcError as exc:
            print(_invoke_failure(args, exc), file=sys.stderr)
            return 1
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from switchgear.emulators import anthropic, graphrag, pinecone, unstructured
    from switchgear.emulators import openai as emulator

    kinds = {"openai": emulator.main, "anthropic": anthropic.main, "pinecone": pinecone.main,
             "graphrag": graphrag.main, "unstructured": unstructured.main}
    usage = (f"usage: switchgear emulate {{{','.join(kinds)}}} [options]\n"
             "  run a protocol-faithful upstream emulator; `switchgear emulate KIND --help` lists its options")
    if args.emulator_args[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not args.emulator_args or args.emulator_args[0] not in kinds:
        print(usage, file=sys.stderr)
        return 2
    return kinds[args.emulator_args[0]](args.emulator_args[1:])


def cmd_demo(args: argparse.Namespace) -> int:
    from switchgear import demo

    return demo.main(requests=args.requests, hold_s=args.hold)


def build_parser() -> argparse.ArgumentParser:
    from switchgear.controlplane.tasks.cli import add_parser as add_tasks_parser
    from switchgear.dataplane.http_door import add_door_arguments
    from switchgear.dataplane.managed.node import add_managed_arguments
    from switchgear.dataplane.worker import add_worker_arguments

    parser = argparse.ArgumentParser(
        prog="switchgear",
        description="Switchgear: a gRPC control plane and data-plane agents for AI applications' external services.",
    )
    parser.add_argument("--version", action="version", version=f"switchgear {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cp = sub.add_parser("controlplane", help="run the control plane (registry, snapshots, admin)")
    cp.add_argument("--config", help="YAML config applied at start-up when it changed since last applied")
    cp.add_argument("--db", default="switchgear.db", help="SQLite file for the registry (default: %(default)s)")
    cp.add_argument("--store", default="", metavar="URL",
                    help="postgresql://... shared by control-plane replicas (instead of --db); "
                         "$SWITCHGEAR_STORE when the value is 'env'")
    cp.add_argument("--advertise", default="", metavar="ADDR",
                    help="address other replicas reach this one at (default: the listen address)")
    cp.add_argument("--replica-id", default="", help="this replica's name in logs and the leader row")
    cp.add_argument("--peer-tls-ca", help="verify other replicas' certificates with this CA (task forwarding)")
    cp.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address (port 0 picks one)")
    cp.add_argument("--ready-file", help="write the listening address here once ready")
    cp.add_argument("--metrics-listen", default="", metavar="ADDR",
                    help="serve Prometheus /metrics here (port 0 picks one; prints 'METRICS addr')")
    for flag, text in (("--report-interval", "seconds between agents' load reports"),
                       ("--health-window", "seconds of load data health scoring looks at"),
                       ("--alert-window", "seconds of load data alert rules look at"),
                       ("--health-debounce", "minimum seconds between health-driven snapshot versions")):
        cp.add_argument(flag, type=float, default=None, help=f"{text} (overrides the config's monitoring section)")
    cp.add_argument("--health-blackout", type=float, default=None,
                    help="seconds after an endpoint's first data before it is scored (default 10)")
    cp.add_argument("--health-min-requests", type=int, default=None,
                    help="finished attempts in the window before an endpoint is scored (default 10)")
    cp.add_argument("--no-probes", action="store_true", help="disable active health checks")
    cp.add_argument("--max-concurrent-pushes", type=int, default=256,
                    help="large snapshots (64 KiB or more) unanswered at once across all agents (bounds a "
                         "reconnect storm; deltas and small snapshots are not held back)")
    cp.add_argument("--delta-history", type=_delta_history, default=64, metavar="N",
                    help="versions whose changes are remembered for agents that take deltas: an agent "
                         "further behind gets the whole snapshot (0 to 4096, default: %(default)s)")
    cp.add_argument("--task-lease-ttl", type=float, default=10.0, metavar="S",
                    help="seconds a task lease lasts without a heartbeat (default: %(default)s)")
    cp.add_argument("--task-aging-interval", type=float, default=60.0, metavar="S",
                    help="seconds of waiting that raise a task's effective priority by 1 (default: %(default)s)")
    cp.add_argument("--admin-auth", choices=("token", "none"), default="token",
                    help="'token': Admin and Governance RPCs need the admin token; 'none': development only")
    cp.add_argument("--admin-token-file", help="the admin token (default: <db>.admin-token, created if missing)")
    cp.add_argument("--agent-auth", choices=("token", "none"), default="token",
                    help="'token': agents' calls need the agent token or a client certificate from "
                         "--tls-client-ca; 'none': loopback development only (see --insecure-agents)")
    cp.add_argument("--agent-token-file", help="the agent token (default: <db>.agent-token, created if missing)")
    cp.add_argument("--insecure-agents", action="store_true",
                    help="with --agent-auth none, listen on a non-loopback address anyway (anyone who reaches "
                         "it can act as an agent)")
    cp.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    cp.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    cp.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    cp.add_argument("--console-listen", default="", metavar="ADDR",
                    help="serve the operator console (web pages) here; off by default (port 0 picks one; "
                         "prints 'CONSOLE url'). Needs --admin-auth token")
    cp.add_argument("--console-viewer-token-file", metavar="FILE",
                    help="a token that opens read-only console sessions (created if missing)")
    cp.add_argument("--console-session-ttl", type=_positive(float), default=3600.0, metavar="S",
                    help="seconds a console login lasts (default: %(default)s)")
    cp.add_argument("--console-max-sessions", type=_positive(int), default=64, metavar="N",
                    help="console sessions kept at once; a new login evicts the oldest (default: %(default)s)")
    cp.add_argument("--console-max-streams", type=_positive(int), default=8, metavar="N",
                    help="live console streams open at once; more answer 503 (default: %(default)s)")
    cp.add_argument("--console-max-body", type=_positive(int), default=1 << 20, metavar="BYTES",
                    help="largest console request body, e.g. an uploaded config; larger ones answer 413 "
                         "(default: %(default)s)")
    cp.add_argument("--console-body-timeout", type=_positive(float), default=10.0, metavar="S",
                    help="seconds a console request body may take to arrive; then 408 (default: %(default)s)")
    cp.add_argument("--console-max-connections", type=_positive(int), default=256, metavar="N",
                    help="console connections open at once; more are closed as they arrive (default: %(default)s)")
    cp.add_argument("--console-insecure-remote", action="store_true",
                    help="allow --console-listen on a non-loopback address (plain HTTP: the token crosses the "
                         "network in the clear)")
    cp.add_argument("--grpc-server", choices=("switchgear", "grpcio"), default="switchgear",
                    help="the gRPC port's server: switchgear's own HTTP/2 (default; ~40 %% less CPU per change "
                         "to 10,000 agents) or grpc.aio")
    rpc_options.add_arguments(cp, GRPC_LIMITS, {"--grpc-max-connections": MAX_CONNECTIONS_DEFAULT})
    cp.add_argument("--log-level", default="info")
    cp.set_defaults(func=cmd_controlplane)

    ag = sub.add_parser("agent", help="run a data-plane agent (Gateway service)")
    ag.add_argument("--control-plane", required=True, help="control-plane address(es), comma separated")
    ag.add_argument("--listen", default="127.0.0.1:50061", help="gRPC address (port 0 picks one)")
    ag.add_argument("--node-id", default="", help="stable agent identity (default: host and pid)")
    ag.add_argument("--zone", default="")
    ag.add_argument("--http-listen", default="", metavar="ADDR",
                    help="also serve the OpenAI-compatible HTTP API here (port 0 picks one; prints 'HTTP addr')")
    ag.add_argument("--grpc-server", choices=("switchgear", "grpcio"), default="switchgear",
                    help="the gRPC port's server: switchgear's own HTTP/2 (default; ~4x less CPU per call) "
                         "or grpc.aio (for A/B runs)")
    rpc_options.add_arguments(ag)
    ag.add_argument("--ready-file", help="write the listening address here once ready")
    ag.add_argument("--metrics-listen", default="", metavar="ADDR",
                    help="serve Prometheus /metrics here (port 0 picks one; prints 'METRICS addr')")
    ag.add_argument("--otlp-endpoint", default="", metavar="URL",
                    help="export traces by OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318 "
                         "(default: tracing off)")
    ag.add_argument("--access-log", default="stderr", metavar="DEST",
                    help="one JSON line per request through either door: 'stderr', 'off', or a file to append "
                         "to (default: %(default)s)")
    ag.add_argument("--metrics-max-tenants", type=_positive_int, default=100, metavar="N",
                    help="distinct tenant label values in request metrics; later tenants count as 'other' "
                         "(default: %(default)s)")
    ag.add_argument("--metrics-max-routes", type=_positive_int, default=500, metavar="N",
                    help="distinct route label values in request metrics; later routes count as 'other' "
                         "(default: %(default)s)")
    ag.add_argument("--trace-sample-ratio", type=float, default=1.0,
                    help="share of new traces sampled when tracing is on (default: %(default)s)")
    ag.add_argument("--auth", choices=("api_key", "none"), default="api_key",
                    help="'api_key': every request needs a tenant's key; 'none': local development only")
    ag.add_argument("--redis", default="", metavar="URL",
                    help="share quota counters and the response cache with other agents (redis:// or unix://)")
    ag.add_argument("--redis-probe-interval", type=float, default=0.5, metavar="S",
                    help="while Redis is unusable, try it again at most this often (default: %(default)s)")
    ag.add_argument("--redis-write-behind-bytes", type=_positive(int), default=4 << 20, metavar="BYTES",
                    help="cache stores waiting to be copied to Redis with the next request's round trip, at most "
                         "this many bytes (and 256 entries); a store that does not fit stays in this agent's "
                         "memory only and is counted in switchgear_redis_stores_dropped_total "
                         "(default: %(default)s)")
    ag.add_argument("--serve-tls-cert", help="serve the gRPC port and the HTTP front door over TLS with this "
                                             "certificate chain (PEM)")
    ag.add_argument("--serve-tls-key", help="the private key of --serve-tls-cert (PEM)")
    ag.add_argument("--serve-tls-client-ca", help="require callers' certificates signed by this CA (mutual TLS)")
    ag.add_argument("--agent-token-file", help="file holding the control plane's agent token (its <db>.agent-token; "
                                               "else $SWITCHGEAR_AGENT_TOKEN)")
    ag.add_argument("--tls-ca", help="verify the control plane's TLS certificate with this CA (PEM)")
    ag.add_argument("--tls-cert", help="client certificate for mutual TLS with the control plane (PEM)")
    ag.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    ag.add_argument("--cache-bytes", type=int, default=64 * 1024 * 1024,
                    help="memory bound of this agent's response cache (default: %(default)s)")
    ag.add_argument("--breaker-open", type=float, default=5.0, metavar="S",
                    help="seconds an endpoint's circuit breaker stays open after its first trip, doubling "
                         "on repeated trips (default: %(default)s)")
    ag.add_argument("--ejection-time", type=float, default=5.0, metavar="S",
                    help="seconds an outlier endpoint is ejected the first time (default: %(default)s)")
    ag.add_argument("--max-json-depth", type=_json_depth, default=64, metavar="N",
                    help="refuse request JSON nested deeper than N levels, on both doors, before any work "
                         "(INVALID_ARGUMENT / HTTP 400 naming the field; default: %(default)s)")
    ag.add_argument("--workers", type=_workers_arg, default=1, metavar="N",
                    help="serve from N processes sharing the gRPC and HTTP ports (SO_REUSEPORT), supervised by "
                         "this one; 'auto': one per core this process may use (default: %(default)s; "
                         "docs/operations/single-node.md: "
                         "Every core)")
    ag.add_argument("--worker-spread", choices=("even", "kernel"), default="even",
                    help="with --workers N > 1: 'even' passes a new connection on to the worker serving the fewest "
                         "(a few long-lived gRPC connections then split 8/8, not 11/5); 'kernel' leaves each where "
                         "SO_REUSEPORT's hash puts it (default: %(default)s)")
    ag.add_argument("--log-level", default="info")
    add_worker_arguments(ag)
    add_managed_arguments(ag)
    add_door_arguments(ag)
    ag.add_argument("--snapshot-delivery", choices=("delta", "whole"), default="delta",
                    help="'delta': ask the control plane for what changed since the version held (whole "
                         "snapshots when it does not know that version); 'whole': every snapshot in full "
                         "(default: %(default)s)")
    ag.add_argument("--sched-slice-us", type=_slice_arg, default=0, metavar="US",
                    help="the event loop's CPU scheduler slice in µs, 100-100000, while two or more upstream "
                         "calls overlap (Linux 6.12+; refused where the kernel does not keep it): a short one "
                         "(100) keeps processes the agent wakes on shared cores (Redis, a local upstream, "
                         "callers) from preempting it mid-burst, for lower added latency under concurrency; "
                         "0: the kernel's always (default: %(default)s; README: The agent's scheduler slice)")
    ag.add_argument("--burst-order", type=_burst_order_arg, default=2, metavar="K|off",
                    help="HTTP requests at once in their forward leg (request read to its upstream call sent), "
                         "1-64; a request arriving when K are under way waits for one to send or finish, at "
                         "most 1 ms behind any of them, and only while the event loop is under 60%% busy: "
                         "lower added latency when requests arrive in bursts; 'off': no gate "
                         "(default: %(default)s; README: The order of work in a burst)")
    ag.set_defaults(func=cmd_agent)

    add_tasks_parser(sub)

    cfg = sub.add_parser("config", help="work with config files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    val = cfg_sub.add_parser("validate", help="print what is wrong, or what would be registered")
    val.add_argument("file")
    val.set_defaults(func=cmd_config_validate)

    adm = sub.add_parser("admin", help="call the control plane's Admin service")
    adm.add_argument("--control-plane", default="127.0.0.1:50051")
    adm.add_argument("--timeout", type=float, default=10.0, help="seconds")
    adm.add_argument("--admin-token-file", help="file holding the admin token (else $SWITCHGEAR_ADMIN_TOKEN)")
    adm_sub = adm.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    for name, help_text in (("services", "list services"),
                            ("agents", "list agents and the versions they ACKed or NACKed"),
                            ("snapshot", "show the snapshot being served")):
        adm_sub.add_parser(name, help=help_text).add_argument(
            "--json", action="store_true", help="print the reply as JSON")
    rep = adm_sub.add_parser("replicas", help="managed replicas: node, state, restarts, a failed one's last lines")
    rep.add_argument("--service", default="", help="only this service's replicas")
    rep.add_argument("--json", action="store_true")
    for name, help_text in (("get", "show one service"), ("deregister", "remove a service")):
        p = adm_sub.add_parser(name, help=help_text)
        p.add_argument("name")
        if name == "get":
            p.add_argument("--json", action="store_true", help="print the reply as JSON")
    apply = adm_sub.add_parser("apply", help="replace the registry with a config file's content")
    apply.add_argument("file")
    apply.add_argument("--dry-run", action="store_true")
    reg = adm_sub.add_parser("register", help="create or replace one service from a JSON file (switchgear.v1.Service)")
    reg.add_argument("file")
    for p in (apply, reg):
        p.add_argument("--wait", action="store_true",
                       help="then wait until every connected agent answered the new version; print each "
                            "agent's ACK/NACK and the services it did not apply; exit 1 on any NACK, "
                            "rejected service or timeout")
        p.add_argument("--wait-timeout", type=_wait_seconds, default=30.0, metavar="S",
                       help="how long --wait waits (default: %(default)s; at most 3600)")
    adm.set_defaults(func=cmd_admin)

    for name, help_text in (("stats", "per-endpoint figures from every agent's load reports"),
                            ("alerts", "alert rules firing now, and recent recoveries")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--control-plane", default="127.0.0.1:50051")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds")
        p.add_argument("--json", action="store_true", help="print the raw response as JSON")
        p.add_argument("--admin-token-file", help="file holding the admin token (else $SWITCHGEAR_ADMIN_TOKEN)")
        if name == "stats":
            p.add_argument("--service", default="", help="only this service")
            p.set_defaults(func=cmd_stats)
        else:
            p.add_argument("--recovered", type=int, default=10, help="recovered alerts to show (default: %(default)s)")
            p.set_defaults(func=cmd_alerts)

    inv = sub.add_parser("invoke", help="call Gateway.Invoke on an agent")
    inv.add_argument("--agent", default="127.0.0.1:50061")
    inv.add_argument("--service", required=True)
    inv.add_argument("--method", default=None,
                     help="the operation (default chat.completions; embeddings for an embedding service)")
    inv.add_argument("--payload", required=True, help="JSON object")
    inv.add_argument("--priority", type=int, default=0)
    inv.add_argument("--user-id", default="")
    inv.add_argument("--api-key", default="", help="the tenant's client key (else $SWITCHGEAR_API_KEY)")
    inv.add_argument("--deadline", type=float, default=0.0, help="request budget in seconds")
    inv.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline in seconds")
    inv.add_argument("--stream", action="store_true", help="call InvokeStream: print each chunk as it arrives")
    inv.set_defaults(func=cmd_invoke)

    emu = sub.add_parser(
        "emulate", add_help=False,
        help="run protocol-faithful upstream emulators (openai, anthropic, pinecone, graphrag, unstructured)",
    )
    emu.add_argument("emulator_args", nargs=argparse.REMAINDER)
    emu.set_defaults(func=cmd_emulate)

    demo = sub.add_parser("demo", help="run the end-to-end demo (no keys, no external servers)")
    demo.add_argument("--requests", type=int, default=120)
    demo.add_argument("--hold", type=float, default=0.0, metavar="S",
                      help="keep everything running S seconds after the story, to look around the console")
    demo.set_defaults(func=cmd_demo)
    from switchgear import cli_governance

    cli_governance.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulate"]:  # each emulator parses its own options (--help included)
        return cmd_emulate(argparse.Namespace(emulator_args=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args))
