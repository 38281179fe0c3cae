"""The fuzz corpus (tests/fuzz/corpus/<target>/) replayed through the same target functions
`make fuzz` runs under atheris: every input the fuzzer kept, every seed, and every crash it
found (files named crash-*) must pass through its parser without a bug showing."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from switchgear.rpc.server import Context, _Reject
from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_corpus_input_passes_its_target(target: str) -> None:
    inputs = sorted((CORPUS / target).iterdir())
    assert any(p.name.startswith("seed-") for p in inputs), "the corpus lost its seeds: python -m tests.fuzz.seed"
    failed = []
    for path in inputs:
        try:
            TARGETS[target](path.read_bytes())
        except Exception as exc:  # every failure is reported, by file
            failed.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not failed, f"{len(failed)} of {len(inputs)} inputs failed:\n" + "\n".join(failed)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/crash-*")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_crash_found_stays_fixed(path: Path) -> None:
    """Inputs that broke a parser, by name: crash-corrupt-deflate (zlib.error out of the message
    reader), crash-empty-header-name (IndexError reading the request's headers),
    crash-bad-base64-bin-header (binascii.Error: a traceback per request)."""
    TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_a_corrupt_compressed_message_is_internal_not_an_exception(encoding: bytes) -> None:
    """Found by the fuzzer (corpus grpc_messages/crash-corrupt-deflate): zlib.error escaped the
    message reader, killing the whole connection on a streaming call."""
    context = Context(SimpleNamespace(max_receive=1024), None, "/m", (), None, encoding, None)  # type: ignore[arg-type]
    header = b"\x78\x9c" if encoding == b"deflate" else gzip.compress(b"")[:10]
    corrupt = header + b"\xff\xff\xff\xff"  # a deflate block of the reserved type 3
    body = b"\x01" + len(corrupt).to_bytes(4, "big") + corrupt
    context._body += body
    with pytest.raises(_Reject) as refused:
        context._next_messages()
    assert refused.value.code is grpc.StatusCode.INTERNAL
