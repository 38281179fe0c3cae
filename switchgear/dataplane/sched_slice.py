"""`agent --sched-slice-us N`: the agent's CPU scheduler slice (Linux 6.12 and later).

Linux's fair scheduler (EEVDF) gives every task a slice, by default 0.7 ms x (1 + log2 of the
CPU count): 1.4 ms on two CPUs. Since Linux 6.12 a task may ask for its own, 0.1 to 100 ms
(sched_setattr(2): `sched_runtime` of a SCHED_OTHER task). A shorter slice gives the task an
earlier virtual deadline, so a process it wakes (Redis, an upstream or a caller on the same
host) no longer preempts it at once: the agent finishes the calls of a burst it is serving
before the processes it woke take its CPU. bench/overhead/README.md (Session 9) measures it:
with a 20 ms upstream at c=16 the production agent was preempted ~1.7 times a call by default;
with 100 us its added median fell by ~0.5 ms, for more CPU per call at that pace (shorter runs,
more wake-ups) and none at full load.

0 (the default) leaves the kernel's slice. Threads and processes started afterwards inherit
the setting (the exporter's threads, the workers of `--workers N`). It is read back once set:
a kernel that does not keep it (before 6.12) or a platform without the system call refuses the
flag with an error, rather than running without it.
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
    """Set thread `tid`'s slice (0: the calling thread) to `us` microseconds, SCHED_OTHER and nice
    kept; OSError saying why when the kernel refuses or does not keep it."""
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise OSError(f"not supported on {platform.machine()} (sched_setattr's number is not known here)")
    setattr_nr, _ = calls
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, os.SCHED_OTHER, 0, os.getpriority(
        os.PRIO_PROCESS, tid), 0, us * 1000, 0, 0, 0, 0), _ATTR.size)
    if libc.syscall(setattr_nr, tid, attr, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sched_setattr: {os.strerror(errno)}")
    kept = current_ns(tid)
    if kept != us * 1000:
        raise OSError(f"the kernel keeps a slice of {kept} ns, not {us * 1000}: custom slices need Linux 6.12 "
                      f"or later (this is {platform.release()})")


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
