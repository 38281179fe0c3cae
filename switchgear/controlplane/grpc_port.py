"""The control plane's gRPC port: switchgear.rpc (the default) or grpc.aio (`--grpc-server`).

Every service (discovery, load reports, admin, governance, tasks, health, reflection) and every
interceptor (admin token, agent token, the replicas' store-outage refusal) is served the same way
on either; TLS and mutual TLS come from the same files (switchgear.tls.add_port).

Why switchgear.rpc: with 10,000 agents each holding its snapshot stream, a change is 10,000
messages out and 10,000 ACKs in on the control plane's one event loop, and grpc.aio's per-message
work was the largest share of it. On switchgear.rpc the control plane spends ~40 % less CPU per
change and half the memory per connected agent (bench/controlplane/README.md, session 9).

What grpc.aio's SERVER_OPTIONS do, and switchgear.rpc's equivalent (`GRPC_LIMITS`):
- keepalive pings without calls are allowed: switchgear.rpc answers every PING, with or without
  calls. grpc.aio takes pings 5 s apart and never punishes faster ones (max_ping_strikes 0);
  switchgear.rpc takes them 5 s apart too and, like grpc-core's default policy, ends a connection
  with GOAWAY too_many_pings after 2 faster ones with nothing sent between (agents ping every
  10 s: dataplane/client.py), so a flood of PINGs cannot hold the loop;
- receive size: 4 MiB on both (grpc's default); answers are not size-limited on either;
- open connections: grpc.aio takes any number (until the process runs out of descriptors);
  switchgear.rpc takes as many as the open-file limit leaves after a reserve for the stores,
  probes, metrics and console (an agent process holds one or two: its snapshot stream and load
  reports share one, its task worker has its own; `--workers N` agents are N agents), or fewer
  with `--grpc-max-connections`;
- streams per connection: grpc.aio unlimited, switchgear.rpc 16,384: a replica forwards its
  agents' task calls to the leader over one connection, each agent's task worker holding a lease
  long poll (up to 30 s) open, so the leader must take one stream per agent on it;
- the rest (windows, header list, output held for a peer that does not read, stream resets,
  preface and idle timeouts) are switchgear.rpc's own bounds, as on the agent's port.
The `--grpc-*` limit flags are switchgear.rpc's; with `--grpc-server grpcio` a limit flag set to
anything but its default is refused (grpc.aio would not apply it).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from collections.abc import Sequence

import grpc
import grpc.aio

from switchgear import rpc
from switchgear.rpc import options as rpc_options

log = logging.getLogger("switchgear.controlplane")

GRPC_SERVERS = ("switchgear", "grpcio")

#: grpc.aio's options on the control plane: let agents' keepalive pings through, so a silent
#: network loss is noticed in seconds.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)

#: switchgear.rpc's bounds on the control plane's port (the module docstring says why each);
#: max_connections: no cap but the open-file limit's (`server`).
GRPC_LIMITS = rpc.Limits(max_concurrent_streams=16_384, max_connections=1 << 20, ping_strikes=2,
                         min_ping_interval_s=5.0)

#: --grpc-max-connections' default as the control plane's help says it.
MAX_CONNECTIONS_DEFAULT = "the open-file limit less 512"

#: Descriptors kept back from --grpc-max-connections: the stores, probes, metrics, console, replicas.
FD_RESERVE = 512


def check(kind: str, limits: rpc.Limits) -> None:
    """ValueError, naming the flag, for a server that is not known or limits it would not apply."""
    if kind not in GRPC_SERVERS:
        raise ValueError(f"--grpc-server: {kind!r} is not one of {', '.join(GRPC_SERVERS)}")
    if kind == "grpcio" and limits != GRPC_LIMITS:
        changed = [flag for flag, field, _, _ in rpc_options.FLAGS
                   if getattr(limits, field) != getattr(GRPC_LIMITS, field)]
        raise ValueError(f"--grpc-server grpcio does not apply {', '.join(changed)}: the gRPC port's limits are "
                         "switchgear.rpc's (--grpc-server switchgear)")


def server(kind: str, limits: rpc.Limits, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
    """The port's server, not bound. ValueError as `check`."""
    check(kind, limits)
    if kind == "grpcio":
        return grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    nofile = _open_file_limit()
    budget = max(16, nofile - FD_RESERVE)
    if limits.max_connections > budget:
        if limits.max_connections == GRPC_LIMITS.max_connections:
            log.info("the gRPC port takes at most %d connections (the open-file limit %d less %d)", budget, nofile,
                     FD_RESERVE)
        else:
            log.warning("--grpc-max-connections lowered from %d to %d by the open-file limit (raise `ulimit -n`)",
                        limits.max_connections, budget)
        limits = dataclasses.replace(limits, max_connections=budget)
    return rpc.Server(interceptors, limits=limits)


def _open_file_limit() -> int:
    """RLIMIT_NOFILE's soft limit, lifted to the hard limit first (one descriptor per agent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft
