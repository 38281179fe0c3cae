"""The agent's flags for its gRPC port's limits (http2.Limits), and what grpc.aio makes of them.

One table: each flag names a Limits field, its defaults are Limits' own, and `limits(args)`
refuses an out-of-range value with the flag's name. `grpcio_options` hands the limits grpc-core
has to `--grpc-server grpcio`; the rest (output, connection window, connections, preface,
resets) are switchgear.rpc's alone, as the README says.
"""

from __future__ import annotations

import argparse

from switchgear.rpc.http2 import Limits

#: flag, Limits field, metavar, what it bounds.
FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--grpc-stream-window", "stream_window", "BYTES", "request bytes one stream may send before they are read"),
    ("--grpc-connection-window", "connection_window", "BYTES", "request bytes one connection may buffer"),
    ("--grpc-max-streams", "max_concurrent_streams", "N", "open streams per connection (REFUSED_STREAM beyond)"),
    ("--grpc-max-header-list", "max_header_list_size", "BYTES", "request header list size"),
    ("--grpc-max-output", "max_output", "BYTES", "output held for a peer that does not read before it is closed"),
    ("--grpc-max-resets", "max_resets_per_s", "N", "stream resets per second per connection (rapid reset)"),
    ("--grpc-max-connections", "max_connections", "N", "open connections to the gRPC port"),
    ("--grpc-preface-timeout", "preface_timeout_s", "S", "seconds for a new connection's preface and SETTINGS"),
    ("--grpc-idle-timeout", "idle_timeout_s", "S", "seconds without an open stream before a connection is "
                                                   "closed (0 = never)"),
    ("--grpc-ping-strikes", "ping_strikes", "N", "PINGs too soon, with no data sent between, before GOAWAY "
                                                 "too_many_pings (0 = no limit)"),
    ("--grpc-min-ping-interval", "min_ping_interval_s", "S", "seconds between a peer's PINGs below which each "
                                                             "is a strike"),
)


def add_arguments(parser: argparse.ArgumentParser, defaults: Limits | None = None,
                  default_text: dict[str, str] | None = None) -> None:
    """The flags, defaulting to `defaults`' values (the agent's: Limits()); `default_text` says a
    flag's default in words instead of its value."""
    defaults = defaults or Limits()
    group = parser.add_argument_group("limits on the gRPC port (see docs/reference/limits.md)")
    for flag, field, metavar, text in FLAGS:
        default = getattr(defaults, field)
        said = (default_text or {}).get(flag, "%(default)s")
        group.add_argument(flag, dest=f"grpc_{field}", type=type(default), default=default, metavar=metavar,
                           help=f"{text} (default: {said})")


def limits(args: argparse.Namespace) -> Limits:
    """The flags' Limits; ValueError naming the flag when one is out of range."""
    values = {field: getattr(args, f"grpc_{field}") for _, field, _, _ in FLAGS}
    try:
        return Limits(**values)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        flag = next((f for f, name, _, _ in FLAGS if name == field), field)
        raise ValueError(f"{flag}: {getattr(args, f'grpc_{field}', '?')} is out of range") from None


def grpcio_options(limits: Limits) -> tuple[tuple[str, int], ...]:
    """The limits grpc-core has, as grpc.aio.server options."""
    options = [("grpc.max_concurrent_streams", limits.max_concurrent_streams),
               ("grpc.max_metadata_size", limits.max_header_list_size),
               ("grpc.http2.max_ping_strikes", limits.ping_strikes),
               ("grpc.http2.min_ping_interval_without_data_ms", int(limits.min_ping_interval_s * 1000))]
    if limits.idle_timeout_s:
        options.append(("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)))
    return tuple(options)


__all__ = ["FLAGS", "add_arguments", "grpcio_options", "limits"]
