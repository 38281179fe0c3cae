"""What an agent accepts (ACK) or rejects (NACK) in a snapshot, and how it reads a request."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from switchgear.adapters import builtin_adapters
from switchgear.dataplane.convert import (
    RequestError,
    SnapshotError,
    call_from_proto,
    snapshot_from_proto,
)
from switchgear.v1 import common_pb2, discovery_pb2, gateway_pb2

ADAPTERS = builtin_adapters()


def wire_service(name: str = "chat", **changes: object) -> common_pb2.Service:
    msg = common_pb2.Service(
        name=name, category=common_pb2.SERVICE_CATEGORY_LLM, protocol="openai",
        endpoints=[common_pb2.Endpoint(id="a", url="http://127.0.0.1:9/v1", weight=1)],
    )
    for key, value in changes.items():
        if key == "endpoints":
            del msg.endpoints[:]
            msg.endpoints.extend(value)  # type: ignore[arg-type]
        elif key == "timeout":
            msg.timeout.CopyFrom(value)  # type: ignore[arg-type]
        elif key == "fallbacks":
            msg.fallbacks.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, key, value)
    return msg


def snapshot(*services: common_pb2.Service, version: str = "7.abc") -> discovery_pb2.Snapshot:
    return discovery_pb2.Snapshot(version=version, services=list(services))


def test_valid_snapshot_is_applied_whole() -> None:
    result = snapshot_from_proto(snapshot(wire_service("a"), wire_service("b")), "7.abc", ADAPTERS)
    assert result.version == "7.abc"
    assert sorted(result.services) == ["a", "b", "llm"]  # and the route over the llm category (README "Routes")
    assert result.services["a"].endpoints[0].url == "http://127.0.0.1:9/v1"
    assert result.services["a"].unsupported == ""


def test_unknown_protocol_is_accepted_but_marked_unsupported() -> None:
    result = snapshot_from_proto(snapshot(wire_service(protocol="carrier-pigeon")), "7.abc", ADAPTERS)
    assert "no adapter for protocol 'carrier-pigeon'" in result.services["chat"].unsupported


@pytest.mark.parametrize(
    ("services", "path"),
    [
        ((wire_service(options_json='{"chat_pth": "/x"}'),), "services[chat].options_json.chat_pth"),
        ((wire_service(options_json="[1]"),), "services[chat].options_json"),
        ((wire_service(options_json="{nope"),), "services[chat].options_json"),
        ((wire_service(endpoints=[]),), "services[chat].endpoints"),
        ((wire_service(endpoints=[common_pb2.Endpoint(id="a", url="ftp://x", weight=1)]),), "services[chat].endpoints[0].url"),
        ((wire_service(endpoints=[common_pb2.Endpoint(id="a", url="http://h/v1", weight=0)]),), "services[chat].endpoints[0].weight"),
        ((wire_service(endpoints=[common_pb2.Endpoint(id="a", url="http://h/v1", weight=1)] * 2),), "services[chat].endpoints[1].id"),
        ((wire_service(category=common_pb2.SERVICE_CATEGORY_UNSPECIFIED),), "services[chat].category"),
        ((wire_service(), wire_service()), "services[chat].name"),
        ((wire_service(name="bad name"),), "services[bad name].name"),
        ((wire_service(fallbacks=["ghost"]),), "services[chat].fallbacks[0]"),
        ((wire_service(timeout=duration_pb2.Duration(seconds=99999)),), "services[chat].timeout"),
    ],
)
def test_unacceptable_snapshot_names_the_field(services: tuple[common_pb2.Service, ...], path: str) -> None:
    with pytest.raises(SnapshotError) as info:
        snapshot_from_proto(snapshot(*services), "7.abc", ADAPTERS)
    assert info.value.path == path


def test_version_mismatch_inside_the_snapshot_is_rejected() -> None:
    with pytest.raises(SnapshotError) as info:
        snapshot_from_proto(snapshot(wire_service(), version="8.x"), "7.abc", ADAPTERS)
    assert info.value.path == "snapshot.version"


def request(**fields: object) -> gateway_pb2.InvokeRequest:
    base: dict[str, object] = {"service": "chat", "method": "chat.completions", "payload": b'{"messages": []}'}
    base.update(fields)
    return gateway_pb2.InvokeRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"service": ""}, "service"),
        ({"method": ""}, "method"),
        ({"payload": b"{not json"}, "payload"),
        ({"payload": b"[1, 2]"}, "payload"),
        ({"priority": 11}, "priority"),
        ({"timeout": duration_pb2.Duration(seconds=-1)}, "timeout"),
        ({"category": 99}, "category"),
    ],
)
def test_malformed_request_names_the_field(fields: dict[str, object], path: str) -> None:
    with pytest.raises(RequestError) as info:
        call_from_proto(request(**fields))
    assert info.value.path == path


def test_request_defaults() -> None:
    call = call_from_proto(request())
    assert call.priority == 5
    assert call.request_id  # made up when the caller sent none
    assert call.payload == {"messages": []}
    assert call.category == ""
