"""Coverage-guided fuzzing of switchgear.rpc with atheris (libFuzzer): `make fuzz`.

    python -m tests.fuzz.fuzz_rpc TARGET [libFuzzer flags...]

TARGET is one of tests/fuzz/targets.py's (frames, hpack, grpc_messages). The corpus is
tests/fuzz/corpus/TARGET/: libFuzzer starts from it and adds every input that reaches new
code, so each run grows it; crashes are written to tests/fuzz/crashes/ (turn each into a test
in tests/test_fuzz_corpus.py, and move the input into the corpus).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["switchgear", "hpack", "tests.fuzz"]):
    from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz.fuzz_rpc {{{','.join(TARGETS)}}} [libFuzzer flags]")
    name = argv[1]
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    target = TARGETS[name]
    atheris.Setup([argv[0], *argv[2:], f"-artifact_prefix={crashes}/{name}-", str(corpus)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
