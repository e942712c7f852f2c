"""How busy the machine was while something was timed: load average, CPU steal, usable CPUs, torch threads.

On a shared CPU other processes only ever add time to a measurement, and by how much depends on how many
runnable processes compete for how many CPUs. A bench figure is only readable beside that record: the same
candidate measured 2x slower under a load average of 4 on 2 CPUs is the machine, not the candidate.
``LoadProbe`` snapshots the counters before, ``LoadProbe.record`` after, and reports both ends plus the
shares of CPU time over the interval that went to other guests (``steal``, from ``/proc/stat`` on a VM)
and that were busy at all (our own work included).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from .detect import _cpu_cores
from .telemetry import _read

# /proc/stat "cpu" line: user nice system idle iowait irq softirq steal guest guest_nice (jiffies)
_IDLE_FIELDS = (3, 4)  # idle, iowait
_STEAL_FIELD = 7
_COUNTED_FIELDS = 8  # guest and guest_nice are already inside user and nice


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the platform has none (Windows)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_times(text: str | None = None) -> list[int] | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (or ``text``) as jiffies; None where it is unreadable."""
    text = _read("/proc/stat") if text is None else text
    if not text:
        return None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            try:
                return [int(v) for v in parts[1 : 1 + _COUNTED_FIELDS]]
            except ValueError:
                return None
    return None


def interval_shares(before: list[int] | None, after: list[int] | None) -> dict[str, float | None]:
    """Shares of all CPU time between two ``cpu_times`` snapshots that were busy and that were stolen."""
    if before is None or after is None or len(before) != len(after):
        return {"busy_fraction": None, "steal_fraction": None}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return {"busy_fraction": None, "steal_fraction": None}
    idle = sum(delta[i] for i in _IDLE_FIELDS if i < len(delta))
    steal = delta[_STEAL_FIELD] if len(delta) > _STEAL_FIELD else None
    return {
        "busy_fraction": round(1 - idle / total, 4),
        "steal_fraction": round(steal / total, 4) if steal is not None else None,
    }


class LoadProbe:
    """Snapshot the machine's load now; ``record()`` later gives the before/after record (a plain dict)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.load_before = load_average()
        self.times_before = cpu_times()

    def record(self) -> dict[str, Any]:
        """``loadavg_before``/``loadavg_after`` ([1, 5, 15] min), ``usable_cpus`` (affinity), ``cpu_count``,
        ``torch_threads``, ``busy_fraction`` and ``steal_fraction`` over the interval (None where
        ``/proc/stat`` is unreadable) and ``interval_s``."""
        return {
            "loadavg_before": self.load_before,
            "loadavg_after": load_average(),
            "usable_cpus": _cpu_cores(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            **interval_shares(self.times_before, cpu_times()),
            "interval_s": round(time.perf_counter() - self.start, 3),
        }
