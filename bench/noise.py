"""How much CPU others took while a measurement ran: on a shared 2-core VM, the figure that says what to distrust.

The machine's busy time (/proc/stat) minus what our own process groups used (the stack, the servers under test)
and this process with its reaped children (wrk): the rest belongs to other processes. Added to it, the time the
hypervisor gave our virtual CPUs to someone else (steal). In cores: 1.0 = one core's worth.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq in the `cpu` line of /proc/stat
_STEAL_FIELD = 7


@dataclass
class Noise:
    """Cores used by others during the `with` block of `watch`; filled in when the block ends."""

    cores: float = field(default=0.0)


@contextmanager
def watch(groups: Collection[int]) -> Iterator[Noise]:
    """Measure what processes outside `groups` (process group ids), this process and its children used."""
    noise = Noise()
    started, (busy, steal), own, ticks = time.monotonic(), _machine_s(), _own_s(), _group_ticks(groups)
    yield noise
    elapsed = time.monotonic() - started
    after = _group_ticks(groups)
    # Only processes alive at the end count: one that exited meanwhile has its time charged to the others.
    groups_s = sum(value - ticks.get(pid, 0) for pid, value in after.items()) / TICKS_PER_S
    busy_after, steal_after = _machine_s()
    others = (busy_after - busy) - (_own_s() - own) - groups_s + (steal_after - steal)
    noise.cores = max(0.0, others / elapsed) if elapsed > 0 else 0.0


def _machine_s() -> tuple[float, float]:
    """Busy time (user, nice, system, irq, softirq) and steal time, summed over every CPU."""
    fields = [int(value) for value in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[index] for index in _BUSY_FIELDS) / TICKS_PER_S, fields[_STEAL_FIELD] / TICKS_PER_S


def _own_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _group_ticks(groups: Collection[int]) -> dict[int, int]:
    """utime + stime of every live process in `groups`, except this one (counted by getrusage)."""
    ticks = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat[2]) in groups:
            ticks[int(entry.name)] = int(stat[11]) + int(stat[12])
    return ticks


def wait_for_quiet(
    groups: Collection[int], *, threshold_cores: float, max_wait_s: float, window_s: float = 1.0
) -> float:
    """Sample `window_s` at a time until others use under `threshold_cores`, for at most `max_wait_s`.

    Returns the last sample: still over the threshold when the wait ran out (the measurement goes ahead anyway,
    and its `others` figure says how disturbed it was).
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        with watch(groups) as sample:
            time.sleep(window_s)
        if sample.cores < threshold_cores or time.monotonic() >= deadline:
            return sample.cores
