"""HPACK decoding (RFC 7541) for request headers, fast on the repeats gRPC traffic is made of.

The `hpack` package decodes correctly but costs ~25 µs per gRPC request header block (a tuple
subclass and a str round trip per field, a debug log call per field, Huffman decoding every
time): 60% of this server's CPU per call when profiled. This decoder keeps the `hpack`
package's static table and Huffman state machine (data and the one routine that reads it) and
adds what a server sees over and over:

- a header block identical to one decoded before under the same dynamic-table state decodes to
  the same fields (a client's second call to a method sends the same bytes): a per-connection
  cache keyed by (table generation, block), with the generation bumped by every table change;
- Huffman-coded strings repeat (authority, user agent, timeouts): a bounded cache per decoder.

Errors raise `hpack.exceptions.HPACKDecodingError` (or InvalidTableSizeError), which the
connection turns into COMPRESSION_ERROR. `decode_request` also says whether the fields make a
well-formed request (RFC 9113 8.2-8.3, `request_problem`), checked once per cached block.
"""

from __future__ import annotations

import re
from collections import deque

from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(STATIC)
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1
_BLOCK_CACHE = 64
_STRING_CACHE = 1024
_CACHED_BLOCK = 1024  # larger blocks are not kept (bounds the cache at 64 KiB per connection)
_CACHED_STRING = 256  # longer Huffman strings are not kept (bounds that cache at 256 KiB)

Fields = list[tuple[bytes, bytes]]
#: A decoded request block: its fields, what makes it malformed (None when nothing does), and
#: its content-length (-1 when absent).
Decoded = tuple[Fields, str | None, int]

# RFC 9113 8.2: names are lowercase tokens (RFC 9110 5.1); values have no CR, LF or NUL.
_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"))
_REQUEST_PSEUDO = {b":method": 1, b":scheme": 2, b":path": 4, b":authority": 8}
_REQUIRED = 1 | 2 | 4
_GOOD_NAMES = 256  # valid header names remembered per connection


def request_problem(fields: Fields, good_names: set[bytes] | None = None) -> tuple[str | None, int]:
    """What makes a request's header list malformed (RFC 9113 8.2-8.3), or None; and its
    content-length (-1 if absent). Requests are never CONNECT here: :method, :scheme and a
    non-empty :path are required. `good_names` remembers regular names found valid (they repeat
    from call to call), so each is checked once."""
    if _BAD_VALUE.search(b"".join([value for _, value in fields])):  # one scan for all values
        bad = next(name for name, value in fields if _BAD_VALUE.search(value))
        return f"CR, LF or NUL in the value of {bad[:64]!r}", -1
    seen, regular, length = 0, False, -1
    for name, value in fields:
        if name and name[0] == 58:  # ':'
            bit = _REQUEST_PSEUDO.get(name, 0)
            if regular:
                return f"pseudo-header {name!r} after a regular header", length
            if not bit:
                return f"pseudo-header {name!r} is not a request's", length
            if seen & bit:
                return f"duplicate {name!r}", length
            if name == b":path" and not value:
                return "empty :path", length
            seen |= bit
        else:
            regular = True
            if good_names is None or name not in good_names:
                if not name or _BAD_NAME.search(name):
                    return f"header name {name[:64]!r} is not a lowercase token", length
                if name in _CONNECTION_SPECIFIC:
                    return f"connection-specific header {name!r}", length
                if good_names is not None and len(good_names) < _GOOD_NAMES:
                    good_names.add(name)
            if name == b"te" and value != b"trailers":
                return "te other than trailers", length
            if name == b"content-length":
                if not value.isdigit() or (length >= 0 and int(value) != length):
                    return "malformed content-length", length
                length = int(value)
    if seen & _REQUIRED != _REQUIRED:
        return "missing :method, :scheme or :path", length
    return None, length


def trailers_problem(fields: Fields) -> str | None:
    """What makes a trailer block malformed: any pseudo-header, or a field a request could not
    carry either."""
    for name, value in fields:
        if name[:1] == b":":
            return f"pseudo-header {name!r} in trailers"
        if not name or _BAD_NAME.search(name) or name in _CONNECTION_SPECIFIC or _BAD_VALUE.search(value):
            return f"malformed trailer {name[:64]!r}"
    return None


class HeaderDecoder:
    """One connection's decoder. `max_table_size` is what we advertise as
    SETTINGS_HEADER_TABLE_SIZE (4096, the default); `max_list_size` bounds the decoded list
    (RFC 7541 4.1 sizes)."""

    def __init__(self, max_table_size: int = 4096, max_list_size: int = 16 * 1024) -> None:
        self._max_setting = max_table_size
        self._max = max_table_size
        self._size = 0
        self._table: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._generation = 0
        self._blocks: dict[tuple[int, bytes], Decoded] = {}
        self._strings: dict[bytes, bytes] = {}
        self._good_names: set[bytes] = set()
        self.max_list_size = max_list_size

    def decode(self, block: bytes) -> Fields:
        return self.decode_request(block)[0]

    def decode_request(self, block: bytes) -> Decoded:
        """The block's fields, with `request_problem`'s verdict on them."""
        key = (self._generation, block)
        cached = self._blocks.get(key)
        if cached is not None:
            return cached
        generation = self._generation
        fields = self._decode(block)
        decoded = (fields, *request_problem(fields, self._good_names))
        if self._generation == generation and len(block) <= _CACHED_BLOCK:  # the block can repeat
            if len(self._blocks) >= _BLOCK_CACHE:
                self._blocks.clear()
            self._blocks[key] = decoded
        return decoded

    def _decode(self, data: bytes) -> Fields:
        fields: Fields = []
        pos, end, total = 0, len(data), 0
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                field = self._entry(index)
            elif byte & 0x40:  # literal with incremental indexing
                field, pos = self._literal(data, pos, 6)
                self._add(field)
            elif byte & 0x20:  # dynamic table size update
                if fields:  # RFC 7541 4.2: only at the start of a block
                    raise HPACKDecodingError("table size update after a header field")
                size, pos = _integer(data, pos, 5)
                if size > self._max_setting:
                    raise InvalidTableSizeError(f"table size {size} over the advertised {self._max_setting}")
                self._max = size
                self._evict()
                self._generation += 1
                continue
            else:  # literal without indexing / never indexed
                field, pos = self._literal(data, pos, 4)
            total += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if total > self.max_list_size:
                raise OversizedHeaderListError(f"header list over {self.max_list_size} bytes")
            fields.append(field)
        return fields

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return STATIC[index - 1]
        dynamic = index - _STATIC_LEN - 1
        if index == 0 or dynamic >= len(self._table):
            raise HPACKDecodingError(f"header index {index} out of range")
        return self._table[dynamic]

    def _literal(self, data: bytes, pos: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        index, pos = _integer(data, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return (name, value), pos

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HPACKDecodingError("header block ends inside a field")
        huffman = data[pos] & 0x80
        length, pos = _integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HPACKDecodingError("string runs past the header block")
        raw = data[pos:end]
        if not huffman:
            return raw, end
        text = self._strings.get(raw)
        if text is None:
            text = decode_huffman(raw)
            if length <= _CACHED_STRING:
                if len(self._strings) >= _STRING_CACHE:
                    self._strings.clear()
                self._strings[raw] = text
        return text, end

    def _add(self, field: tuple[bytes, bytes]) -> None:
        self._generation += 1
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if size > self._max:  # an entry larger than the table empties it (RFC 7541 4.4)
            self._table.clear()
            self._size = 0
            return
        self._table.appendleft(field)
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) at `pos`; returns it and the position after it."""
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HPACKDecodingError("integer runs past the header block")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HPACKDecodingError("integer over 2^28")
