"""`agent --sched-slice-us N`: the agent's CPU scheduler slice while calls overlap (Linux 6.12+).

Linux's fair scheduler (EEVDF) gives every task a slice, by default 0.7 ms x (1 + log2 of the
CPU count): 1.4 ms on two CPUs. Since Linux 6.12 a task may ask for its own, 0.1 to 100 ms
(sched_setattr(2): `sched_runtime` of a SCHED_OTHER task). A shorter slice gives the task an
earlier virtual deadline, so a process it wakes (Redis, an upstream or a caller on the same
host) no longer preempts it at once: the agent finishes the calls of a burst before the
processes it woke take its CPU. With one call at a time that is the wrong way round (the caller
it just answered had better run before the agent's after-answer bookkeeping), so `BusySlice`
gives the event loop's thread the short slice only while two or more upstream attempts are in
flight, and the kernel's otherwise. bench/overhead/README.md (Session 9) measures it: with a
20 ms upstream at c=16 the production agent was preempted ~1.7 times a call by default, and its
added median fell by ~0.6-0.9 ms with 100 µs, for ~15 % more CPU per call at that pace (shorter
runs, more wake-ups; none more at full load); c=1 was unchanged (a slice held always cost it
~0.25 ms).

0 (the default) leaves the kernel's slice. The flag is checked once at start (set, read back,
set back): a kernel that does not keep it (before 6.12) or a platform without the system call
refuses it with an error, rather than running without it. Each worker of `--workers N` runs
its own `BusySlice` on its own loop.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import struct

MIN_US, MAX_US = 100, 100_000  # what the kernel accepts (it clamps anything else into this range)

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr
_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes)


def slice_arg(text: str) -> int:
    """The flag's value: 0, or microseconds from MIN_US to MAX_US."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of microseconds: {text!r}") from None
    if value != 0 and not MIN_US <= value <= MAX_US:
        raise argparse.ArgumentTypeError(f"{value} is outside {MIN_US}..{MAX_US} µs (or 0: the kernel's slice)")
    return value


def apply(us: int, tid: int = 0) -> None:
    """Set thread `tid`'s slice (0: the calling thread) to `us` microseconds (0: the kernel's),
    SCHED_OTHER and nice kept; OSError saying why when the kernel refuses or does not keep it."""
    _Setter(us, tid)()
    kept = current_ns(tid)
    if us and kept != us * 1000:
        raise OSError(f"the kernel keeps a slice of {kept} ns, not {us * 1000}: custom slices need Linux 6.12 "
                      f"or later (this is {platform.release()})")


class _Setter:
    """One sched_setattr call, its arguments built once (BusySlice makes it on the event loop)."""

    def __init__(self, us: int, tid: int = 0) -> None:
        calls = _SYSCALLS.get(platform.machine())
        if calls is None:
            raise OSError(f"not supported on {platform.machine()} (sched_setattr's number is not known here)")
        self._nr, self._tid = calls[0], tid
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._attr = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, os.SCHED_OTHER, 0, os.getpriority(
            os.PRIO_PROCESS, tid), 0, us * 1000, 0, 0, 0, 0), _ATTR.size)

    def __call__(self) -> None:
        if self._libc.syscall(self._nr, self._tid, self._attr, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sched_setattr: {os.strerror(errno)}")


class BusySlice:
    """An attempt observer (events.py) that gives the event loop's thread the short slice while
    two or more upstream attempts are in flight, and the kernel's otherwise: with one call at a
    time the process it wakes (the caller reading its answer) is better run at once, with many
    the agent is better left to finish the burst (module docstring). One system call per change,
    not per call. Made on the loop's thread, which it changes."""

    after_answer = False  # (not a counting observer: it hears a success's end at once)

    def __init__(self, us: int) -> None:
        self._short, self._kernels = _Setter(us), _Setter(0)
        self.running = 0
        self.short = False
        self.changes = 0

    def attempt_started(self, event: object) -> None:
        self.running += 1
        if self.running >= 2 and not self.short:
            self._set(True)

    def attempt_ended(self, event: object) -> None:
        self.running -= 1
        if self.running <= 1 and self.short:
            self._set(False)

    def _set(self, short: bool) -> None:
        try:
            (self._short if short else self._kernels)()
        except OSError:  # (checked at start: only a kernel that changed under us)
            return
        self.short = short
        self.changes += 1


def current_ns(tid: int = 0) -> int:
    """Thread `tid`'s slice in nanoseconds as the kernel reports it (sched_getattr's sched_runtime)."""
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise OSError(f"not supported on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    out = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(calls[1], tid, out, _ATTR.size, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sched_getattr: {os.strerror(errno)}")
    return int(_ATTR.unpack(out.raw)[5])
