"""A gRPC server on the event loop, for the agent's application-facing port and the control plane's.

A drop-in for `grpc.aio.server()` where the agent uses it: generated `add_*Servicer_to_server`
functions, grpc.aio ServerInterceptors, grpc_health's and grpc_reflection's aio servicers, and
handlers written against `grpc.aio.ServicerContext` all work unchanged. The wire is gRPC over
HTTP/2 as specified (PROTOCOL-HTTP2.md in grpc's repository): length-prefixed messages (gzip and
deflate accepted, answers uncompressed), `grpc-timeout` deadlines, metadata with base64 `-bin`
values, status in trailers (trailers-only when nothing else was sent), percent-encoded
`grpc-message`, HTTP 405/415 for requests that are not gRPC; TLS and mutual TLS through an
ssl.SSLContext (`add_tls_port`). It exists for speed (see http2.py); the control plane serves
on it too (controlplane/grpc_port.py), for its 10,000 agents' snapshot streams.

Semantics match grpc.aio's server where handlers can tell: an exception ends the call UNKNOWN
"Unexpected <class>: ...", `abort` raises `grpc.aio.AbortError`, a passed deadline cancels the
handler and answers DEADLINE_EXCEEDED, a client's cancel cancels the handler, requests over
`max_receive_message_length` answer RESOURCE_EXHAUSTED; with client certificates,
`auth_context()` and `peer_identities()` carry grpc's x509 keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import logging
import resource
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NoReturn

import grpc
import grpc.aio

from switchgear.rpc import http2
from switchgear.rpc import spread as spread_mod
from switchgear.rpc.http2 import (
    Connection,
    Limits,
    Refusal,
    Stream,
    Warnings,
    literal,
    literal_indexed_name,
    status_field,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # grpc's default
_CONTENT_TYPE = literal_indexed_name(31, b"application/grpc")  # static entry 31: content-type
_ACCEPT = literal(b"grpc-accept-encoding", b"identity,deflate,gzip")
_HEAD = http2.STATUS_200 + _CONTENT_TYPE + _ACCEPT
_OK = literal(b"grpc-status", b"0")
_RESERVED = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding",
                       b"connection", b"host"))
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


class _Details(collections.namedtuple("_Details", ("method", "invocation_metadata")),
               grpc.HandlerCallDetails):  # type: ignore[misc]
    pass


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _percent(message: str) -> bytes:
    """grpc-message encoding: UTF-8, with bytes outside printable ASCII and '%' as %XX."""
    raw = message.encode()
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def _encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    out = []
    for key, value in metadata:
        name = key.lower().encode()
        if name.endswith(b"-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append(literal(name, base64.b64encode(raw).rstrip(b"=")))
        else:
            out.append(literal(name, value.encode() if isinstance(value, str) else value))
    return b"".join(out)


def _decode_value(name: bytes, value: bytes) -> str | bytes:
    if name.endswith(b"-bin"):  # padded or not, as grpc sends; anything else is refused as grpc-core does
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    return value.decode("latin-1")


def _status_block(code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]] = ()) -> bytes:
    block = _OK if code is grpc.StatusCode.OK else literal(b"grpc-status", str(code.value[0]).encode())
    if details and code is not grpc.StatusCode.OK:
        block += literal(b"grpc-message", _percent(details))
    if trailing:
        block += _encode_metadata(trailing)
    return block


def _timeout(value: bytes) -> float:
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _TIMEOUT_UNITS:
        raise _Reject(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {value.decode('latin-1')!r}")
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


class Context(grpc.aio.ServicerContext):  # type: ignore[misc]
    """One call: grpc.aio.ServicerContext for handlers, and the call's state for the server."""

    def __init__(self, server: Server, stream: Stream, method: str, metadata: tuple[tuple[str, str | bytes], ...],
                 handler: grpc.RpcMethodHandler, encoding: bytes, deadline: float | None) -> None:
        self._server = server
        self._stream = stream
        self._method = method
        self._metadata = metadata
        self._handler = handler
        self._encoding = encoding
        self._deadline = deadline
        self._body = bytearray()  # request-streaming calls: bytes not yet cut into messages
        self._chunks: list[bytes] = []  # unary requests: the body as it arrived
        self._size = 0
        self._inbox: asyncio.Queue[tuple[bytes, int] | None] | None = None  # messages and their size on the wire
        # Stream window (request-streaming calls): a partial message's bytes are credited as they
        # arrive (it may be larger than the window: grpc-go does the same); a complete message's
        # bytes not credited that way are `_owed` until the handler reads it.
        self._precredited = 0
        self._owed = 0
        self._code = grpc.StatusCode.OK
        self._details = ""
        self._initial: Sequence[tuple[str, str | bytes]] = ()
        self._trailing: Sequence[tuple[str, str | bytes]] = ()
        self._head_sent = False
        self._finished = False
        self._expired = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    # --- reading the request --------------------------------------------------------------------

    def _message(self, body: bytes | bytearray) -> bytes:
        compressed, length = body[0], int.from_bytes(body[1:5], "big")
        payload = bytes(body[5:5 + length])
        if not compressed:
            return payload
        limit = self._server.max_receive
        if self._encoding in (b"gzip", b"deflate"):
            inflater = zlib.decompressobj(31 if self._encoding == b"gzip" else 15)
            try:
                out = inflater.decompress(payload, limit + 1)
            except zlib.error:  # corrupt input is the caller's error, as in grpc (found by tests/fuzz)
                raise _Reject(grpc.StatusCode.INTERNAL, "Failed to decompress the message") from None
            if len(out) > limit:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Received message larger than max (over {limit} bytes once decompressed)")
            return out
        raise _Reject(grpc.StatusCode.UNIMPLEMENTED,
                      f"Compression algorithm {self._encoding.decode('latin-1') or 'identity'!r} not supported "
                      "for a compressed message")

    def _next_messages(self) -> list[tuple[bytes, int]]:
        """Complete messages at the head of the body buffer, removed from it, with their sizes."""
        body, out, pos = self._body, [], 0
        limit = self._server.max_receive
        while len(body) - pos >= 5:
            length = int.from_bytes(body[pos + 1:pos + 5], "big")
            if length > limit:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Received message larger than max ({length} vs. {limit})")
            if len(body) - pos - 5 < length:
                break
            out.append((self._message(body[pos:pos + 5 + length]), 5 + length))
            pos += 5 + length
        del body[:pos]
        return out

    # --- grpc.aio.ServicerContext ---------------------------------------------------------------

    async def read(self) -> Any:
        if self._inbox is None:
            raise grpc.aio.UsageError("read() is for request-streaming calls")
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)
            return grpc.aio.EOF
        raw, size = item
        stream, owed = self._stream, min(self._owed, size)
        stream.conn.release(stream, size)
        if owed:
            self._owed -= owed
            stream.conn.credit(stream, owed)
        return self._server._deserialize(self, raw)

    async def write(self, message: Any) -> None:
        if self._finished:
            raise grpc.aio.UsageError("the call has ended")
        serialize = self._handler.response_serializer
        data = serialize(message) if serialize is not None else message
        conn, stream = self._stream.conn, self._stream
        if conn.send(stream, None if self._head_sent else self._head(), b"\x00" + len(data).to_bytes(4, "big") + data,
                     None):
            await conn.wait_sent(stream)
        else:
            await conn.drain()
        self._head_sent = True

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        if self._head_sent:
            raise grpc.aio.UsageError("initial metadata has been sent")
        self._initial = tuple(initial_metadata)
        if self._handler.response_streaming:  # a unary answer carries them with its message
            self._stream.conn.send(self._stream, self._head(), b"", None)
            self._head_sent = True

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._trailing

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_compression(self, compression: grpc.Compression) -> None:
        pass  # answers are sent uncompressed

    def disable_next_message_compression(self) -> None:
        pass

    def peer(self) -> str:
        return self._stream.conn.peer

    def peer_identities(self) -> list[bytes] | None:
        """The client certificate's subject alternative names, else its common name (grpc's
        rule); None without a verified client certificate."""
        context = self.auth_context()
        key = self.peer_identity_key()
        return context[key] if key is not None else None

    def peer_identity_key(self) -> str | None:
        context = self.auth_context()
        for key in ("x509_subject_alternative_name", "x509_common_name"):
            if context.get(key):
                return key
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        """grpc's auth context keys for a TLS connection with a verified client certificate."""
        cert = self._stream.conn.peer_cert
        if not cert:
            return {}
        common = [value.encode() for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        alternative = [value.encode() for _, value in cert.get("subjectAltName", ())]
        return {"transport_security_type": [b"ssl"], "x509_common_name": common,
                "x509_subject_alternative_name": alternative}

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._finished

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    # --- answering ----------------------------------------------------------------------------

    def _head(self) -> bytes:
        return _HEAD + _encode_metadata(self._initial) if self._initial else _HEAD

    def _status_block(self, code: grpc.StatusCode, details: str) -> bytes:
        return _status_block(code, details, self._trailing)

    def _finish(self, code: grpc.StatusCode, details: str, message: bytes | None = None) -> None:
        """Sends the answer's end (and a unary answer's message with it) in one write."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        stream = self._stream
        trailers = self._status_block(code, details)
        if message is not None:
            stream.conn.send(stream, self._head(), b"\x00" + len(message).to_bytes(4, "big") + message, trailers)
        elif self._head_sent:
            stream.conn.send(stream, None, b"", trailers)
        else:  # trailers-only
            stream.conn.send(stream, None, b"", self._head() + trailers)
        callbacks, self._callbacks = self._callbacks, []  # once each, and no reference kept
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("done callback of %s failed", self._method)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            self._finish(self._code, self._details)
        elif isinstance(exc, _Reject):
            self._finish(exc.code, exc.details)
        else:
            log.exception("%s failed", self._method, exc_info=exc)
            self._finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")

    def _expire(self) -> None:
        self._expired = self._cancelled = True
        if self._stream.task is not None:
            self._stream.task.cancel()
        else:  # still waiting for the request
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _reset(self, stream: Stream) -> None:
        self._cancelled = True
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        if self._inbox is not None:
            self._inbox.put_nowait(None)


class Server(grpc.aio.Server):  # type: ignore[misc]
    """See the module docstring. `interceptors` are grpc.aio ServerInterceptors, run in order;
    `limits` bound every connection (http2.Limits); `max_concurrent_streams` and
    `max_header_list_size`, when given, override those two of them."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = (), *,
                 max_receive_message_length: int = DEFAULT_MAX_RECEIVE, limits: Limits | None = None,
                 max_concurrent_streams: int | None = None, max_header_list_size: int | None = None,
                 warnings: Warnings | None = None, reuse_port: bool = False,
                 spread: spread_mod.Group | None = None) -> None:
        self._interceptors = tuple(interceptors)
        self.max_receive = max_receive_message_length
        limits = limits or Limits()
        if max_concurrent_streams is not None:
            limits = dataclasses.replace(limits, max_concurrent_streams=max_concurrent_streams)
        if max_header_list_size is not None:
            limits = dataclasses.replace(limits, max_header_list_size=max_header_list_size)
        self.limits = limits
        self.warnings = warnings or Warnings()
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._reuse_port = reuse_port  # SO_REUSEPORT: processes of one agent share the port
        self._spread_group = spread  # with --workers: connections spread evenly over them (spread.py)
        self._spread: spread_mod.Spread | None = None
        self._listeners: list[asyncio.AbstractServer | spread_mod.Acceptor] = []
        self._connections: set[Connection] = set()
        self._stopped: asyncio.Event | None = None
        # The interceptor chain, built once: each call enters it with its HandlerCallDetails.
        chain: Callable[[grpc.HandlerCallDetails], Any] | None = None
        if self._interceptors:
            chain = self._innermost
            for interceptor in reversed(self._interceptors):
                chain = _bind(interceptor, chain)
        self._intercepted = chain

    # --- grpc.aio.Server ----------------------------------------------------------------------

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        for method, handler in method_handlers.items():
            self._registered[f"/{service_name}/{method}"] = handler

    def add_insecure_port(self, address: str) -> int:
        """Binds now (like grpc.aio) and returns the port; "host:0" picks one, shared by every
        address the host resolves to."""
        return self._bind(address, None)

    def add_tls_port(self, address: str, context: ssl.SSLContext) -> int:
        """Like add_insecure_port, serving TLS with `context` (switchgear.tls.ServerTls makes
        one: ALPN "h2", TLS 1.2 or later, client certificates when configured). grpc's
        ServerCredentials are opaque, hence a context instead of add_secure_port."""
        return self._bind(address, context)

    def _bind(self, address: str, context: ssl.SSLContext | None) -> int:
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]")
        port = int(port_text)
        infos: list[tuple[socket.AddressFamily, str]]
        if host in ("", "::", "0.0.0.0", "*"):
            infos = [(socket.AF_INET6, "::")] if socket.has_ipv6 else [(socket.AF_INET, "0.0.0.0")]
        else:
            seen: dict[tuple[socket.AddressFamily, str], None] = {}
            for af, _, _, _, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
                seen[(af, str(sockaddr[0]))] = None
            infos = list(seen)
        for family, ip in infos:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and ip == "::":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((ip, port))
            except OSError:
                sock.close()
                if port == 0 and len(infos) > 1:
                    continue  # e.g. localhost's ::1 without IPv6: the other address serves
                raise
            port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
            self._sockets.append((sock, context))
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise NotImplementedError("grpc.ServerCredentials are opaque: use add_tls_port with an ssl.SSLContext")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        _check_descriptors(self.limits.max_connections)
        if self._spread_group is not None and self._sockets:
            self._spread = spread_mod.Spread(self._spread_group, "grpc")
        for sock, context in self._sockets:
            handshake = self.limits.preface_timeout_s if context is not None else None  # TLS slowloris too
            if self._spread is not None:
                acceptor = spread_mod.Acceptor(sock, self._connection, self._spread, context, handshake)
                acceptor.start()
                self._listeners.append(acceptor)
                continue
            self._listeners.append(await loop.create_server(self._connection, sock=sock, ssl=context,
                                                            ssl_handshake_timeout=handshake))

    async def stop(self, grace: float | None) -> None:
        """Refuses new connections and streams (GOAWAY), lets open calls finish for `grace`
        seconds, then cancels what is left and closes every connection."""
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.goaway()
        if grace and self._connections:
            waits = [asyncio.ensure_future(conn.closed.wait()) for conn in self._connections]
            _, pending = await asyncio.wait(waits, timeout=grace)
            for waiter in pending:
                waiter.cancel()
        for conn in list(self._connections):
            for stream in list(conn.streams.values()):
                if stream.task is not None:
                    stream.task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        for listener in self._listeners:
            await listener.wait_closed()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        if self._stopped is None:
            return True
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- calls ----------------------------------------------------------------------------------

    def _connection(self) -> asyncio.Protocol:
        if len(self._connections) >= self.limits.max_connections:
            self.warnings.warn("connections", "refused a connection: %d are open, the most allowed",
                               len(self._connections))
            return Refusal()
        # Counted once connected (with TLS: once the handshake is done; one that fails never
        # reaches the connection, and would otherwise hold its place for good).
        return Connection(self._on_stream, self.limits, self._gone, self.warnings, on_open=self._opened)

    def _opened(self, conn: Connection) -> None:
        self._connections.add(conn)
        if self._spread is not None:
            self._spread.serving(len(self._connections))

    def _gone(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if self._spread is not None:
            self._spread.serving(len(self._connections))

    def _on_stream(self, stream: Stream) -> None:
        """A request's headers: check them, find the method, and read the body."""
        method = content_type = b""
        path = ""
        encoding = b"identity"
        timeout: bytes | None = None
        metadata = []
        conn = stream.conn
        for name, value in stream.headers:
            if name[0] == 58:  # ':'
                if name == b":path":
                    path = value.decode("latin-1")
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name not in _RESERVED:
                try:
                    metadata.append((name.decode("latin-1"), _decode_value(name, value)))
                except binascii.Error:  # grpc-core's answer, word for word
                    text = name.decode("latin-1")
                    self.warnings.warn("bin", "refused a call from %s: invalid base64 in metadata %r", conn.peer, text)
                    conn.send(stream, None, b"", _HEAD + _status_block(
                        grpc.StatusCode.INTERNAL, f"Error parsing {text!r} metadata: illegal base64 encoding"))
                    return
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            code = 405 if method != b"POST" else 415
            conn.send(stream, None, b"", status_field(code) + literal(b"content-type", b"text/plain"))
            return
        handler = self._registered.get(path) or self._lookup(_Details(path, tuple(metadata)))
        context = Context(self, stream, path, tuple(metadata), handler, encoding, None)
        stream.call = context
        stream.on_reset = context._reset
        try:
            if handler is None:
                raise _Reject(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            if timeout is not None:
                loop = asyncio.get_running_loop()
                context._deadline = loop.time() + _timeout(timeout)
                context._timer = loop.call_at(context._deadline, context._expire)
        except _Reject as exc:
            context._fail(exc)
            return
        if handler.request_streaming:
            context._inbox = asyncio.Queue()
            stream.on_data = self._stream_data
            stream.task = asyncio.get_running_loop().create_task(self._run(context))
        else:
            stream.on_data = self._unary_data

    def _unary_data(self, stream: Stream, chunk: bytes, ended: bool) -> None:
        context: Context = stream.call
        if context._finished:
            return
        if chunk:
            # The stream window is given back as bytes arrive (the handler can only consume the
            # whole message, which max_receive bounds); the connection's once it is whole.
            context._chunks.append(chunk)
            context._size += len(chunk)
            stream.conn.credit(stream, len(chunk))
            declared = _declared_length(context._chunks) if context._size - len(chunk) < 5 <= context._size else 0
            if declared > self.max_receive or context._size > self.max_receive + 5:
                # Refused once the 5-byte prefix says so, not after max_receive bytes have come in.
                context._fail(_Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"Received message larger than max ({max(declared, context._size - 5)} vs. "
                                      f"{self.max_receive})"))
                return
        if ended:
            stream.conn.release(stream, context._size)
            stream.task = asyncio.get_running_loop().create_task(self._run(context))

    def _stream_data(self, stream: Stream, chunk: bytes, ended: bool) -> None:
        context: Context = stream.call
        assert context._inbox is not None
        if context._finished:
            return
        context._body += chunk
        try:
            consumed = 0
            for message in context._next_messages():
                context._inbox.put_nowait(message)
                consumed += message[1]
            early = min(consumed, context._precredited)  # of these messages' bytes, credited as a partial
            context._owed += consumed - early
            partial = len(context._body)
            if partial > context._precredited - early:
                stream.conn.credit(stream, partial - (context._precredited - early))
            context._precredited = partial
        except _Reject as exc:
            if stream.task is not None:
                stream.task.cancel()
            context._fail(exc)
            return
        if ended:
            context._inbox.put_nowait(None)

    def _lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._registered.get(details.method)
        if handler is None:
            handler = next((h for g in self._generic if (h := g.service(details)) is not None), None)
        return handler

    async def _innermost(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._lookup(details)

    async def _run(self, context: Context) -> None:
        try:
            if self._intercepted is not None:
                handler = await self._intercepted(_Details(context._method, context._metadata))
            else:
                handler = context._handler
            if handler is None:
                raise _Reject(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            context._handler = handler
            if handler.request_streaming:
                request: Any = self._requests(context)
            else:
                request = self._request(context)
            if handler.unary_unary is not None:
                await self._answer(context, await handler.unary_unary(request, context))
            elif handler.stream_unary is not None:
                await self._answer(context, await handler.stream_unary(request, context))
            else:
                behaviour = handler.unary_stream or handler.stream_stream
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        await context.write(item)
                else:
                    await result
                context._finish(context._code, context._details)
        except asyncio.CancelledError:
            if context._expired:
                context._cancelled = True
                context._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif not context._finished:
                context._finish(grpc.StatusCode.CANCELLED, "Cancelled")
        except BaseException as exc:
            context._fail(exc)
            if not isinstance(exc, Exception):
                raise

    def _request(self, context: Context) -> Any:
        chunks = context._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(body) < 5:
            raise _Reject(grpc.StatusCode.INTERNAL, "request had no message")
        length = int.from_bytes(body[1:5], "big")
        if len(body) != 5 + length:
            raise _Reject(grpc.StatusCode.INTERNAL, "request was not exactly one message")
        return self._deserialize(context, context._message(body))

    def _deserialize(self, context: Context, raw: bytes) -> Any:
        """A request message, or grpc.aio's answer to one that does not parse: UNKNOWN with the
        exception, logged as one rate-limited line rather than a traceback."""
        deserialize = context._handler.request_deserializer
        try:
            return deserialize(raw) if deserialize is not None else raw
        except Exception as exc:
            self.warnings.warn("deserialize", "refused a call to %s from %s: its request does not parse (%s)",
                               context._method, context._stream.conn.peer, type(exc).__name__)
            raise _Reject(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}") from exc

    async def _requests(self, context: Context) -> AsyncIterator[Any]:
        while (message := await context.read()) is not grpc.aio.EOF:
            yield message

    async def _answer(self, context: Context, response: Any) -> None:
        if context._code is not grpc.StatusCode.OK:  # set_code without abort: no message
            context._finish(context._code, context._details)
            return
        serialize = context._handler.response_serializer
        try:
            data = serialize(response) if serialize is not None else response
        except Exception as exc:
            raise _Reject(grpc.StatusCode.INTERNAL, f"Failed to serialize response: {exc}") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise _Reject(grpc.StatusCode.INTERNAL, "the handler returned no response")
        if context._head_sent:
            await context.write(response)
            context._finish(grpc.StatusCode.OK, "")
        else:
            context._finish(grpc.StatusCode.OK, "", bytes(data))


def _check_descriptors(connections: int) -> None:
    """Says so when the connection cap cannot be reached: the process would run out of file
    descriptors first (and then refuse everything, the HTTP door included)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and connections + 256 > soft:
        log.warning("max_connections %d is within 256 of the file-descriptor limit %d: raise the limit "
                    "(ulimit -n) or lower --grpc-max-connections", connections, soft)


def _bind(interceptor: grpc.aio.ServerInterceptor,
          continuation: Callable[[grpc.HandlerCallDetails], Any]) -> Callable[[grpc.HandlerCallDetails], Any]:
    async def call(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return await interceptor.intercept_service(continuation, details)
    return call


def server(interceptors: Sequence[grpc.aio.ServerInterceptor] = (), **options: Any) -> Server:
    return Server(interceptors, **options)


__all__ = ["Context", "Server", "server"]


def _declared_length(chunks: list[bytes]) -> int:
    """The length a unary request's 5-byte gRPC prefix declares, from its first chunks."""
    head = b""
    for chunk in chunks:
        head += chunk[:5 - len(head)]
        if len(head) == 5:
            break
    return int.from_bytes(head[1:5], "big")
