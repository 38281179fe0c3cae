"""Coverage-guided fuzzing of switchgear.rpc with atheris (libFuzzer): `make fuzz`.

    python -m tests.fuzz.fuzz_rpc TARGET [libFuzzer flags...]

TARGET is one of tests/fuzz/targets.py's (frames, hpack, grpc_messages). The corpus is
tests/fuzz/corpus/TARGET/: libFuzzer starts from it and adds every input that reaches new
code, so each run grows it; crashes are written to tests/fuzz/crashes/ (turn each into a test
in tests/test_fuzz_corpus.py, and move the input into the corpus as crash-<what>). To shrink
a grown corpus to the inputs that add coverage:

    python -m tests.fuzz.fuzz_rpc TARGET -merge=1 NEWDIR   # then keep seed-* and crash-* too
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["switchgear", "hpack", "tests.fuzz"]):
    from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
CHILD = "SWITCHGEAR_FUZZ_TARGET"


def main(argv: list[str]) -> None:
    if os.environ.get(CHILD):  # libFuzzer re-running itself (-merge, -fork): its own argv, no target name
        name = os.environ[CHILD]
        atheris.Setup(argv, TARGETS[name])
        atheris.Fuzz()
        return
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz.fuzz_rpc {{{','.join(TARGETS)}}} [libFuzzer flags]")
    name = argv[1]
    os.environ[CHILD] = name
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    target = TARGETS[name]
    # argv[0] is how libFuzzer starts its children (-merge, -fork), through the shell
    command = f"{sys.executable} -m tests.fuzz.fuzz_rpc"
    atheris.Setup([command, *argv[2:], f"-artifact_prefix={crashes}/{name}-", str(corpus)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
