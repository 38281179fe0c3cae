"""switchgear.rpc.headers: the HPACK decoder agrees with the `hpack` package's, block after
block on one connection, and its caches never hand back fields of another table state."""

from __future__ import annotations

from dataclasses import dataclass

import hpack
import pytest
from hpack import huffman_table
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from switchgear.rpc import headers as headers_module
from switchgear.rpc.headers import STATIC, HeaderDecoder

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_STATIC_LEN = len(STATIC)


def _string(value: bytes, huffman: bool) -> bytes:
    """An HPACK string literal (RFC 7541 5.2)."""
    if huffman:
        value = _HUFFMAN.encode(value)
    length = encode_integer(len(value), 7)
    if huffman:
        length[0] |= 0x80
    return bytes(length) + value


def without_indexing(name: bytes | int, value: bytes, huffman: bool) -> bytes:
    """"Literal without indexing" (RFC 7541 6.2.2, 0000 prefix): `hpack.Encoder` never emits it,
    gRPC clients do. `name` is a table index or a new name."""
    if isinstance(name, int):
        return bytes(encode_integer(name, 4)) + _string(value, huffman)
    return b"\x00" + _string(name, huffman) + _string(value, huffman)


# --- agreement with the hpack package ---------------------------------------------------------

# Names and values mostly from a small pool, so blocks hit the static table, repeat fields the
# dynamic table holds, and repeat whole blocks; some arbitrary bytes and long values (multi-byte
# lengths, entries larger than a shrunken table).
_NAMES = st.one_of(
    st.sampled_from([b":method", b":path", b":authority", b"content-type", b"te", b"grpc-timeout",
                     b"user-agent", b"x-tenant", b"x-trace-bin", b"authorization", b"accept-encoding"]),
    st.binary(min_size=1, max_size=20).map(lambda b: bytes(c | 0x20 for c in b)),  # no uppercase ASCII
)
_VALUES = st.one_of(
    st.sampled_from([b"POST", b"GET", b"/switchgear.v1.GatewayService/Invoke", b"application/grpc", b"trailers",
                     b"100m", b"grpc-python/1.85", b"", b"gzip, deflate"]),
    st.binary(max_size=40),
    st.binary(min_size=200, max_size=600),
)
_FIELD = st.tuples(_NAMES, _VALUES, st.booleans())  # (name, value, sensitive)

Field = tuple[bytes, bytes, bool]


@dataclass
class Block:
    """One header block of a connection: `fields` from the encoder, then `plain` fields that
    leave the table alone ("without indexing", name by static index or new), then `tail` from the
    encoder again; Huffman on or off; maybe a table size change before it; and maybe `repeat`ed
    ("bytes": the same bytes again; "encode": the same list encoded again)."""

    fields: list[Field]
    plain: list[tuple[int | bytes, bytes, bool]]
    tail: list[Field]
    huffman: bool
    table_size: int | None
    repeat: str


_BLOCK = st.builds(
    Block,
    fields=st.lists(_FIELD, max_size=10),
    plain=st.lists(st.tuples(st.one_of(st.integers(1, _STATIC_LEN), _NAMES), _VALUES, st.booleans()), max_size=3),
    tail=st.lists(_FIELD, max_size=4),
    huffman=st.booleans(),
    table_size=st.one_of(st.none(), st.sampled_from([0, 1, 64, 100, 256, 1024, 4096])),
    repeat=st.sampled_from(["no", "bytes", "encode"]),
)


def _tuples(fields: list[Field]) -> list[hpack.HeaderTuple]:
    return [hpack.NeverIndexedHeaderTuple(n, v) if sensitive else hpack.HeaderTuple(n, v) for n, v, sensitive in fields]


def _agree(reference: hpack.Decoder, ours: HeaderDecoder, block: bytes) -> bool:
    """Both decoders give the same fields, or both fail; False once they have failed (their
    tables are then undefined, as on a connection that a COMPRESSION_ERROR ends)."""
    try:
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
    except HPACKDecodingError:
        with pytest.raises(HPACKDecodingError):
            ours.decode(block)
        return False
    assert ours.decode(block) == expected
    return True


@settings(max_examples=150, deadline=None)
@given(blocks=st.lists(_BLOCK, min_size=1, max_size=8))
def test_decodes_what_the_hpack_package_decodes(blocks: list[Block]) -> None:
    encoder = hpack.Encoder()
    reference = hpack.Decoder(max_header_list_size=16 * 1024)
    ours = HeaderDecoder(max_list_size=16 * 1024)
    for spec in blocks:
        if spec.table_size is not None:
            encoder.header_table_size = spec.table_size
        # The encoder's table size change, if any, goes out at the start of the block (RFC 7541
        # 4.2); an empty list would leave it for the tail, after the plain fields.
        block = encoder.encode(_tuples(spec.fields or [(b":method", b"POST", False)]), huffman=spec.huffman)
        block += b"".join(without_indexing(n, v, h) for n, v, h in spec.plain)
        block += encoder.encode(_tuples(spec.tail), huffman=spec.huffman)
        if not _agree(reference, ours, block):
            return
        if spec.repeat == "encode":  # the same list again: a client's next call to the method
            block = encoder.encode(_tuples(spec.fields), huffman=spec.huffman)
        if spec.repeat != "no" and not _agree(reference, ours, block):  # "bytes": the very same again
            return
        # The same bytes under whatever the table now holds: the newest two dynamic entries, and
        # a literal named after the newest (or errors, alike, while the table is short).
        for probe in (b"\xbe\xbf", without_indexing(62, b"v", False)):
            if not _agree(reference, ours, probe):
                return


def test_grpc_request_block_from_hpack_encoder() -> None:
    encoder = hpack.Encoder()
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p.S/M"), (b":authority", b"127.0.0.1:1"),
              (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"5S")]
    decoder = HeaderDecoder()
    assert decoder.decode(encoder.encode(fields)) == fields
    second = encoder.encode(fields)  # now all from the dynamic table: one byte a field
    assert len(second) == len(fields)
    assert decoder.decode(second) == fields


# --- the caches -------------------------------------------------------------------------------

def test_same_block_twice_same_fields() -> None:
    decoder = HeaderDecoder()
    block = without_indexing(4, b"/a.B/C", True) + b"\x83" + without_indexing(b"x-tenant", b"acme", False)
    first = decoder.decode(block)
    assert first == [(b":path", b"/a.B/C"), (b":method", b"POST"), (b"x-tenant", b"acme")]
    assert decoder.decode(block) == first
    assert decoder.decode(bytes(block)) == first  # an equal block, not the same object


def test_cached_block_follows_the_dynamic_table() -> None:
    """A block referring to dynamic index 62 means whatever the table holds at the time: a
    block cached before an insertion must not answer for the table after it."""
    decoder = HeaderDecoder()
    insert = hpack.Encoder()
    decoder.decode(insert.encode([(b"x-tenant", b"one")]))
    reference = b"\xbe"  # indexed field 62: the newest dynamic entry
    assert decoder.decode(reference) == [(b"x-tenant", b"one")]
    assert decoder.decode(reference) == [(b"x-tenant", b"one")]  # from the cache
    decoder.decode(insert.encode([(b"x-tenant", b"two")]))
    assert decoder.decode(reference) == [(b"x-tenant", b"two")]
    assert decoder.decode(b"\xbf") == [(b"x-tenant", b"one")]  # 63: pushed down a place
    # A literal naming a dynamic entry (literal without indexing, name index 62).
    named = without_indexing(62, b"three", False)
    assert decoder.decode(named) == [(b"x-tenant", b"three")]
    decoder.decode(insert.encode([(b"x-other", b"four")]))
    assert decoder.decode(named) == [(b"x-other", b"three")]


def test_cached_block_follows_a_table_size_change() -> None:
    decoder = HeaderDecoder()
    decoder.decode(hpack.Encoder().encode([(b"x-tenant", b"one")]))
    assert decoder.decode(b"\xbe") == [(b"x-tenant", b"one")]
    decoder.decode(b"\x20")  # table size 0: everything evicted
    with pytest.raises(HPACKDecodingError):
        decoder.decode(b"\xbe")


def test_block_that_inserts_is_applied_every_time() -> None:
    """A block with a "literal with incremental indexing" changes the table each time it is
    decoded: decoding it again must insert again, not come from a cache."""
    decoder = HeaderDecoder()
    block = b"\x40" + _string(b"x-n", False) + _string(b"v", False)
    assert decoder.decode(block) == [(b"x-n", b"v")]
    assert decoder.decode(block) == [(b"x-n", b"v")]
    assert decoder.decode(b"\xbe\xbf") == [(b"x-n", b"v"), (b"x-n", b"v")]  # two entries, not one


def test_huffman_strings_cached_per_value(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = huffman_table.decode_huffman

    def counting(data: bytes) -> bytes:
        calls.append(bytes(data))
        return real(data)

    monkeypatch.setattr(headers_module, "decode_huffman", counting)
    decoder = HeaderDecoder()
    a = without_indexing(b"x-a", b"some value", True)
    b = without_indexing(b"x-b", b"some value", True)
    assert decoder.decode(a) == [(b"x-a", b"some value")]
    assert decoder.decode(b) == [(b"x-b", b"some value")]
    assert calls.count(_HUFFMAN.encode(b"some value")) == 1


def test_block_cache_is_bounded() -> None:
    decoder = HeaderDecoder()
    for i in range(500):
        block = without_indexing(b"x-n", str(i).encode(), False)
        assert decoder.decode(block) == [(b"x-n", str(i).encode())]
    assert len(decoder._blocks) <= headers_module._BLOCK_CACHE
    big = without_indexing(b"x-big", b"v" * 2000, False)
    assert decoder.decode(big) == [(b"x-big", b"v" * 2000)]
    assert not any(block == big for _, block in decoder._blocks)  # large blocks are not kept


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\x80", HPACKDecodingError),  # indexed field 0
        (b"\xbe", HPACKDecodingError),  # 62: the dynamic table is empty
        (b"\xff\x80\x01", HPACKDecodingError),  # index 127 + 128 = 255
        (b"\x0f\x2f\x01a", HPACKDecodingError),  # literal naming index 15 + 47 = 62
        (b"\x00\x03ab", HPACKDecodingError),  # name of 3 bytes, 2 there
        (b"\x00\x01a\x05abc", HPACKDecodingError),  # value runs past the block
        (b"\x00\x01a", HPACKDecodingError),  # the value is missing
        (b"\x00", HPACKDecodingError),  # the name is missing
        (b"\xff", HPACKDecodingError),  # index integer with its continuation byte missing
        (b"\xff\x80\x80", HPACKDecodingError),  # continuation bytes still announce more
        (b"\x00\x7f", HPACKDecodingError),  # string length integer cut short
        (b"\xff\xff\xff\xff\xff\xff\x01", HPACKDecodingError),  # integer beyond 2^28
        (b"\x00\x81\xff", HPACKDecodingError),  # invalid Huffman (EOS padding of 8 bits)
        (b"\x3f\xe2\x1f", InvalidTableSizeError),  # table size 31 + 4066 = 4097
        (b"\x3f\xe1\xff\x03", InvalidTableSizeError),  # a much larger size
    ],
)
def test_malformed_blocks_raise(block: bytes, error: type[Exception]) -> None:
    decoder = HeaderDecoder()
    with pytest.raises(error):
        decoder.decode(block)
    assert issubclass(error, HPACKDecodingError)


def test_table_size_update_at_the_maximum_is_accepted() -> None:
    decoder = HeaderDecoder()
    assert decoder.decode(b"\x3f\xe1\x1f\x82") == [(b":method", b"GET")]  # 31 + 4065 = 4096, then field 2


def test_table_size_update_after_a_field_is_an_error() -> None:
    """RFC 7541 4.2: a size update after the first field of a block is a decoding error (the
    hpack package and h2spec's hpack/4.2/1 agree)."""
    with pytest.raises(HPACKDecodingError):
        hpack.Decoder().decode(b"\x82\x20")
    with pytest.raises(HPACKDecodingError):
        HeaderDecoder().decode(b"\x82\x20")


def test_header_list_over_max_list_size() -> None:
    decoder = HeaderDecoder(max_list_size=100)
    field = without_indexing(b"x-a", b"v" * 30, False)  # 3 + 30 + 32 = 65 bytes
    assert decoder.decode(field) == [(b"x-a", b"v" * 30)]
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(field + field)
    assert issubclass(OversizedHeaderListError, HPACKDecodingError)
    # The bound counts decoded sizes: an indexed field of one byte still counts 32 + its strings.
    small = HeaderDecoder(max_list_size=32 + 7 + 4)  # ":method" "POST" fits exactly once
    assert small.decode(b"\x83") == [(b":method", b"POST")]
    with pytest.raises(OversizedHeaderListError):
        small.decode(b"\x83\x83")


def test_eviction_at_the_exact_size() -> None:
    """Entries cost name + value + 32 bytes (RFC 7541 4.1); the oldest go first, and a table
    exactly full keeps them all."""
    decoder = HeaderDecoder()
    decoder.decode(b"\x3f\x63")  # table size 31 + 99 = 130: two 65-byte entries
    insert = [b"\x40" + _string(b"x-%d" % i, False) + _string(b"v" * 30, False) for i in range(3)]  # 65 each
    decoder.decode(insert[0])
    decoder.decode(insert[1])
    assert decoder.decode(b"\xbe\xbf") == [(b"x-1", b"v" * 30), (b"x-0", b"v" * 30)]  # 130 of 130
    decoder.decode(insert[2])
    assert decoder.decode(b"\xbe\xbf") == [(b"x-2", b"v" * 30), (b"x-1", b"v" * 30)]
    with pytest.raises(HPACKDecodingError):
        decoder.decode(b"\xc0")  # 64: x-0 was evicted
    decoder.decode(b"\x3f\x22")  # size 31 + 34 = 65: shrinking evicts x-1
    assert decoder.decode(b"\xbe") == [(b"x-2", b"v" * 30)]
    with pytest.raises(HPACKDecodingError):
        decoder.decode(b"\xbf")


def test_entry_larger_than_the_table_empties_it() -> None:
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HeaderDecoder()
    encoder.header_table_size = 100
    first = encoder.encode([(b"x-a", b"1")])
    assert ours.decode(first) == [(bytes(n), bytes(v)) for n, v in reference.decode(first, raw=True)]
    big = b"\x40" + _string(b"x-big", False) + _string(b"v" * 200, False)  # 237 bytes > 100
    assert ours.decode(big) == [(b"x-big", b"v" * 200)]
    with pytest.raises(HPACKDecodingError):
        ours.decode(b"\xbe")  # neither the big entry nor x-a is left


# --- request checks (RFC 9113 8.2-8.3) ----------------------------------------------------------------

_GOOD = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/s/M"), (b":authority", b"a"),
         (b"content-type", b"application/grpc"), (b"te", b"trailers")]


@pytest.mark.parametrize(("fields", "problem"), [
    (_GOOD, None),
    ([*_GOOD, (b"X-Upper", b"1")], "not a lowercase token"),
    ([*_GOOD, (b"bad name", b"1")], "not a lowercase token"),
    ([*_GOOD, (b"", b"1")], "not a lowercase token"),
    ([*_GOOD, (b"keep-alive", b"1")], "connection-specific"),
    ([*_GOOD[:5], (b"te", b"gzip")], "te other than trailers"),
    ([*_GOOD, (b"x", b"a\r\nb")], "CR, LF or NUL"),
    ([*_GOOD, (b"x", b"a\x00b")], "CR, LF or NUL"),
    ([*_GOOD, (b":path", b"/again")], "after a regular header"),
    ([(b":status", b"200"), *_GOOD], "not a request's"),
    ([(b":method", b"GET"), *_GOOD], "duplicate"),
    (_GOOD[1:], "missing"),
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"")], "empty :path"),
    ([*_GOOD, (b"content-length", b"12"), (b"content-length", b"13")], "malformed content-length"),
    ([*_GOOD, (b"content-length", b"-1")], "malformed content-length"),
])
def test_request_problems(fields: list[tuple[bytes, bytes]], problem: str | None) -> None:
    found, _ = headers_module.request_problem(fields, set())
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_only_valid_names_are_remembered() -> None:
    good: set[bytes] = set()
    assert headers_module.request_problem([*_GOOD, (b"x-ok", b"1"), (b"X-Bad", b"1")], good)[0] is not None
    assert b"x-ok" in good and b"X-Bad" not in good
    assert headers_module.request_problem([*_GOOD, (b"content-length", b"7")], good) == (None, 7)
    assert headers_module.trailers_problem([(b"x-t", b"1")]) is None
    assert headers_module.trailers_problem([(b":path", b"/")]) is not None
