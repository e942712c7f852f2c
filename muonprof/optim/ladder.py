"""The ladder controller: where on its ladder a layer runs, moved by its quality signal (pure host logic).

ProfiledMuon measures each adaptive layer's signal every ``every`` steps (``ortho.signals``, on the device),
reads all of them in one ``tolist`` (after an all_reduce under torch.distributed, so every rank sees the same
numbers) and hands each to ``decide``. The rules (``profile.schema.Ladder``):

- up one rung as soon as the signal is below ``floor``;
- down one rung after ``patience`` consecutive measurements at or above ``floor + margin``;
- a descent is on probation for ``patience`` measurements: if the cheaper rung falls below the floor within
  them, the layer climbs back and the next descent needs twice the patience (``failures`` doubles it each
  time, and resets once a descent holds, or when a rung that had held falls: the spectrum moved). On a
  stationary spectrum where the cheaper rung is not good enough the layer therefore tries it after p, 2p,
  4p, ... measurements: O(log t) moves, not a flap every p + 1.

Everything here is plain Python on host numbers: it is what ``state_dict`` saves, so a resumed run takes
the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profile.resolve import LadderPlan

HISTORY = 32  # (step, signal, rung) entries kept per layer in the state_dict
MAX_FAILURES = 16  # caps the back-off at patience x 2^16 measurements


@dataclass
class RungState:
    """One layer's position on its ladder and the counters its next decision depends on."""

    rung: int
    calm: int = 0  # consecutive measurements at or above floor + margin
    failures: int = 0  # consecutive descents that fell back (doubles the patience of the next one)
    probation: int = 0  # measurements left in which a fall below the floor counts as a failed descent
    history: list[tuple[int, float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "calm": self.calm,
            "failures": self.failures,
            "probation": self.probation,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RungState:
        return cls(
            rung=int(data["rung"]),
            calm=int(data.get("calm", 0)),
            failures=int(data.get("failures", 0)),
            probation=int(data.get("probation", 0)),
            history=[(int(s), float(v), int(r)) for s, v, r in data.get("history", [])],
        )


def decide(state: RungState, ladder: LadderPlan, signal: float, step: int) -> int:
    """Update ``state`` with one measurement of the active rung's ``signal``; returns the rung to run next."""
    state.history.append((step, float(signal), state.rung))
    del state.history[:-HISTORY]
    top = len(ladder.rungs) - 1
    if signal < ladder.floor:
        state.calm = 0
        if state.probation > 0:
            state.failures = min(state.failures + 1, MAX_FAILURES)
            state.probation = 0
        else:
            state.failures = 0  # a rung that had held fell: the spectrum moved, so no back-off is owed
        if state.rung < top:
            state.rung += 1
        return state.rung
    if state.probation > 0:
        state.probation -= 1
        if state.probation == 0:
            state.failures = 0  # the cheaper rung held for a full probation
    if signal < ladder.floor + ladder.margin:
        state.calm = 0
        return state.rung
    state.calm += 1
    if state.rung > 0 and state.calm >= ladder.patience * 2**state.failures:
        state.rung -= 1
        state.calm = 0
        state.probation = ladder.patience
    return state.rung


class TraceError(ValueError):
    """A ladder trace file that cannot be read (missing, or a line that is not a move record)."""


TRACE_KEYS = ("step", "layer", "from", "to", "signal")


def read_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The move records of a ``ladder_trace`` file (JSON lines), in file order; TraceError names the bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise TraceError(f"{path}: cannot read the trace ({err.__class__.__name__})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TraceError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or any(k not in row for k in TRACE_KEYS):
            raise TraceError(f"{path}:{number}: a ladder move needs {', '.join(TRACE_KEYS)}")
        rows.append(row)
    return rows


def summarize_trace(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer (in order of first move): moves up and down, the first and last step that moved, the rung
    it started from and ended on (with their recipes), and the lowest signal that made it climb."""
    layers: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = layers.setdefault(
            row["layer"],
            {
                "layer": row["layer"],
                "moves": 0,
                "up": 0,
                "down": 0,
                "first_step": row["step"],
                "start_rung": row["from"],
                "start_recipe": row.get("from_recipe"),
                "min_signal_up": None,
            },
        )
        entry["moves"] += 1
        up = row["to"] > row["from"]
        entry["up" if up else "down"] += 1
        if up and (entry["min_signal_up"] is None or row["signal"] < entry["min_signal_up"]):
            entry["min_signal_up"] = row["signal"]
        entry.update(last_step=row["step"], end_rung=row["to"], end_recipe=row.get("to_recipe"))
    return list(layers.values())
