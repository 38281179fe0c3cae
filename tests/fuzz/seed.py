"""The fuzz corpus's seeds: valid inputs for each target, built with real encoders.

`python -m tests.fuzz.seed` (re)writes tests/fuzz/corpus/<target>/seed-*; inputs the fuzzer
found (other names) are left alone.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import hpack

from switchgear.rpc.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from tests.fuzz.targets import BLOCK_SEPARATOR, SERVICE

CORPUS = Path(__file__).resolve().parent / "corpus"


def message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((int(compressed),)) + struct.pack(">I", len(payload)) + payload


def request_headers(method: str, *extra: tuple[str, str], huffman: bool = True, encoder: hpack.Encoder | None = None
                    ) -> bytes:
    encoder = encoder or hpack.Encoder()
    fields = [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{method}"),
              (":authority", "127.0.0.1:50061"), ("content-type", "application/grpc"), ("te", "trailers"),
              ("grpc-timeout", "5S"), ("user-agent", "grpc-python/1.85"), *extra]
    return bytes(encoder.encode(fields, huffman=huffman))


SETTINGS_FRAME = frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20) + struct.pack(">HI", 2, 0))
SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def frames_seeds() -> dict[str, bytes]:
    """Bytes after the client preface (the target adds it), as real clients send them."""
    encoder = hpack.Encoder()
    unary = request_headers("Unary", encoder=encoder)
    again = request_headers("Unary", encoder=encoder)  # the same request, now from the dynamic table
    hello = message(b"hello")
    gz = message(gzip.compress(b"hello" * 40), compressed=True)
    headers = request_headers("Unary", ("x-request-id", "abc"), ("trace-bin", "AAEC"))
    split = len(headers) // 2
    gz_headers = request_headers("Unary", ("grpc-encoding", "gzip"))
    priority = b"\x00\x00\x00\x00\x10"
    return {
        "unary": SETTINGS_FRAME + SETTINGS_ACK + frame(HEADERS, END_HEADERS, 1, unary)
        + frame(DATA, END_STREAM, 1, hello),
        "two-unary-calls": SETTINGS_FRAME + frame(HEADERS, END_HEADERS, 1, unary) + frame(DATA, END_STREAM, 1, hello)
        + frame(HEADERS, END_HEADERS, 3, again) + frame(DATA, END_STREAM, 3, hello),
        "streaming": SETTINGS_FRAME + frame(HEADERS, END_HEADERS, 1, request_headers("Stream"))
        + frame(DATA, 0, 1, message(b"one") + message(b"two")[:4]) + frame(DATA, 0, 1, message(b"two")[4:])
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000)) + frame(DATA, END_STREAM, 1, b""),
        "gzip-message": SETTINGS_FRAME + frame(HEADERS, END_HEADERS, 1, gz_headers) + frame(DATA, END_STREAM, 1, gz),
        "continuation-bin-metadata": SETTINGS_FRAME + frame(HEADERS, 0, 1, headers[:split])
        + frame(CONTINUATION, END_HEADERS, 1, headers[split:]) + frame(DATA, END_STREAM, 1, hello),
        "padded-priority": SETTINGS_FRAME
        + frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, b"\x02" + priority + unary + b"\x00\x00")
        + frame(PRIORITY, 0, 1, priority) + frame(DATA, END_STREAM | PADDED, 1, b"\x01" + hello + b"\x00"),
        "ping-reset-goaway": SETTINGS_FRAME + frame(PING, 0, 0, b"12345678") + frame(PING, ACK, 0, b"12345678")
        + frame(HEADERS, END_HEADERS, 1, unary) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8))
        + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)),
        "trailers-and-unknown-frame": SETTINGS_FRAME + frame(HEADERS, END_HEADERS, 1, request_headers("Stream"))
        + frame(DATA, 0, 1, hello) + frame(0x42, 0, 0, b"whatever")
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(hpack.Encoder().encode([("x-trailer", "1")]))),
        "not-grpc": SETTINGS_FRAME + frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(hpack.Encoder().encode(
            [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")]))),
        "window-settings": SETTINGS_FRAME + frame(HEADERS, END_HEADERS, 1, unary)
        + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 10) + struct.pack(">HI", 5, 32768))
        + frame(DATA, END_STREAM, 1, hello) + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)),
    }


def hpack_seeds() -> dict[str, bytes]:
    encoder = hpack.Encoder()
    first = request_headers("Unary", encoder=encoder)
    second = request_headers("Unary", ("x-id", "2"), encoder=encoder)
    plain = request_headers("Stream", huffman=False)
    never = bytes(hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple("authorization", "Bearer sk-test")]))
    sized = hpack.Encoder()
    sized.header_table_size = 256
    resized = bytes(sized.encode([("x-long", "v" * 300), ("x-a", "b")]))
    return {"request": first, "two-blocks": first + BLOCK_SEPARATOR + second, "no-huffman": plain,
            "never-indexed": never, "table-size-update": resized}


def grpc_messages_seeds() -> dict[str, bytes]:
    hello = message(b"hello")
    deflated = message(zlib.compress(b"hello" * 100), compressed=True)
    return {
        "identity-one": b"\x00" + hello,
        "identity-two-small-pieces": b"\x00" + hello + message(b""),
        "gzip": b"\x05" + message(gzip.compress(b"hello" * 100), compressed=True),
        "deflate": b"\x06" + deflated,
        "unsupported-encoding": b"\x03" + deflated,
        "empty-message": b"\x00" + message(b""),
    }


SEEDS = {"frames": frames_seeds, "hpack": hpack_seeds, "grpc_messages": grpc_messages_seeds}


def write() -> None:
    for target, build in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in build().items():
            (folder / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    write()
