"""`python -m bench.soak.probe <switchgear args>`: runs `switchgear <args>` (the soak's agent) with
a probe the soak reads figures from that the process's /metrics does not carry:

- garbage collections and their pauses by generation (a `gc.callbacks` hook: two clock reads
  per collection),
- on request, live objects counted by type (after a full collection; frozen start-up objects
  are not counted, so what grows is what calls left behind), and, when the environment sets
  `SOAK_TRACEMALLOC=1` (costly: every allocation is traced), the allocation sites whose
  memory grew most since the previous request.

The probe answers on the Unix socket named by `SOAK_PROBE_SOCKET` (the soak's private temporary
directory), one line in (`gc` or `objects`), one JSON document out, from a thread of its own.
The bench only: the agent itself has no such socket.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import socket
import threading
import time
import tracemalloc
import weakref
from typing import Any

TOP = 12  # object types / allocation sites reported


class GcPauses:
    """Collections and the seconds they took, by generation, since the process started."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._began

    def figures(self) -> dict[str, Any]:
        return {"collections": list(self.count), "pause_s": list(self.seconds),
                "cpu_s": time.process_time()}


class Objects:
    """Live objects by type, and what grew since the previous call."""

    def __init__(self) -> None:
        self._snapshot: tracemalloc.Snapshot | None = None

    def figures(self) -> dict[str, Any]:
        gc.collect()
        by_type = collections.Counter(_kind(o) for o in gc.get_objects())
        out: dict[str, Any] = {"objects": sum(by_type.values()), "by_type": dict(by_type.most_common(200))}
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces((
                tracemalloc.Filter(False, tracemalloc.__file__),))
            if self._snapshot is not None:
                out["grown"] = [
                    {"site": str(stat.traceback[0]), "kib": stat.size_diff / 1024, "blocks": stat.count_diff}
                    for stat in snapshot.compare_to(self._snapshot, "lineno")[:TOP]]
            self._snapshot = snapshot
            out["traced_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
        return out


def _kind(o: object) -> str:
    """An object's type, module-qualified; a weak reference's says what it refers to (a cache of
    weak references to classes and one to requests' objects grow alike, and mean different things)."""
    kind = type(o)
    if kind is weakref.ReferenceType:
        return f"weakref to {type(o()).__qualname__}"  # type: ignore[operator]
    return f"{kind.__module__}.{kind.__qualname__}"


def serve(path: str, pauses: GcPauses, objects: Objects) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        os.chmod(path, 0o600)
        server.listen(4)
        while True:
            conn, _ = server.accept()
            with conn:
                word = conn.makefile("r").readline(64).strip()
                try:
                    figures = objects.figures() if word == "objects" else pauses.figures()
                except Exception as exc:  # the probe stays up: the soak reports what went wrong
                    figures = {"error": repr(exc)}
                conn.sendall(json.dumps(figures).encode())


def ask(path: str, word: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The probe's answer to `word` (the soak's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(word.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer


def main() -> int:
    from switchgear.cli import main as switchgear_main

    pauses = GcPauses()
    gc.callbacks.append(pauses)
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        tracemalloc.start(1)
    threading.Thread(target=serve, args=(os.environ["SOAK_PROBE_SOCKET"], pauses, Objects()),
                     name="soak-probe", daemon=True).start()
    return switchgear_main()


if __name__ == "__main__":
    raise SystemExit(main())
