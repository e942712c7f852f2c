"""The candidate grid: which orthogonalizer configurations bench measures.

The default grid covers DESIGN.md's family at a size that takes minutes, not hours, on a CPU for
GPT-2-small: Newton-Schulz steps 1-8 x schedules x {bf16, fp32} (cheap, because NS cost is shared
across schedules and its accuracy comes from the spectral model), the exact SVD, and the low-rank
family (power range finder with 0-2 power iterations, column selection, randomized SVD) at a handful
of ranks, and LiMuon's low-rank momentum (``momentum_rank``) at the same ranks. Flags narrow it; the
torch default (Jordan x 5, bf16) is always in, as the baseline every speed-up is measured against.

Approximations that keep the tail (DESIGN.md): ``error_feedback`` adds, per rank, an error-feedback twin of
lowrank (power, 1 iteration) and of rsvd (the momentum keeps what the rank-r update did not apply), and
``subset`` adds Dion2-style subset orthogonalization at ``fractions`` (1/4 and 1/2 of the long side by
default), both with the low-rank family's core and dtypes. Their one-step accuracy understates them: bench
adds a multi-step figure when the spectra carry a gradient window (``bench.multistep``).

Same math, fewer flops (DESIGN.md): ``gram`` adds a Gram Newton-Schulz twin (``ortho.gram``, default restarts)
of every Newton-Schulz candidate. Its accuracy is its twin's polynomial (spectral model, nothing to simulate);
only its timing is new, one per (steps, dtype, cubic pattern) like plain Newton-Schulz, and only on shapes
where it saves flops: ``fits`` offers it when its flop count is at most ``GRAM_MAX_FLOP_RATIO`` of the plain
iteration's (for 5 quintic steps, an aspect ratio of about 2.2 or more; never on square matrices, where it
costs more).

``momentum_rank`` is not an orthogonalizer but a different optimizer state: the momentum is kept as
rank-r randomized-SVD factors and the update is U V^T straight from them (``optim.lowrank_momentum``).
It replaces Newton-Schulz entirely, so bench treats it as one more candidate (a ``MomentumRank``, not an
``OrthoConfig``) whose cost is the per-step expand + lerp + compress + direction and whose optimizer state
is (m + n + 1) r numbers instead of m n. It costs about as much to bench as ``rsvd`` at the same ranks
(one timing per shape and rank, one simulated accuracy per layer, rank and seed), so it is in the default
grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..optim.state_memory import muon_state_bytes
from ..ortho import METHODS, SCHEDULES, OrthoConfig
from ..ortho.config import DTYPE_ALIASES, DTYPES
from ..ortho.gram import configured_newton_schulz_flops

BASELINE = OrthoConfig()  # torch.optim.Muon's default: 5 Jordan steps in bf16
MOMENTUM_RANK = "momentum_rank"  # the low-rank-momentum family's name in --methods
ERROR_FEEDBACK = "error_feedback"  # error-feedback twins of the low-rank candidates, in --methods
GRAM = "gram"  # Gram Newton-Schulz twins of the Newton-Schulz candidates, in --methods
GRID_METHODS: tuple[str, ...] = (*METHODS, MOMENTUM_RANK, ERROR_FEEDBACK, GRAM)
GRAM_MAX_FLOP_RATIO = 0.9  # offer a Gram twin where it needs <= 90% of plain Newton-Schulz's flops
RANKED_METHODS = frozenset({"lowrank", "rsvd", MOMENTUM_RANK})
DEFAULT_STEPS: tuple[int, ...] = tuple(range(1, 9))
DEFAULT_SCHEDULES: tuple[str, ...] = ("jordan", "polar_express", "quintic", "cubic", "you")
DEFAULT_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
DEFAULT_RANKS: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_POWER_ITERS: tuple[int, ...] = (0, 1, 2)
DEFAULT_FRACTIONS: tuple[float, ...] = (0.25, 0.5)  # subset (Dion2): shares of the long side per step
EF_POWER_ITERS = 1  # the power-iteration count of lowrank's error-feedback twin (one per rank, not per count)
# The low-rank methods orthogonalize their small r x n core with the he2025 recipe (5 Jordan steps):
# the core is where little time goes, so varying it would multiply the grid for nothing.
CORE_STEPS = 5
CORE_SCHEDULE = "jordan"


class GridError(ValueError):
    """A flag that names an unknown method/schedule/dtype, a bad rank or step count; one line."""


@dataclass(frozen=True)
class MomentumRank:
    """A low-rank-momentum candidate (LiMuon): the momentum kept as rank-``rank`` factors U, S, V.

    Duck-types the parts of ``OrthoConfig`` bench and tune read (``method``, ``rank``, ``dtype``, ``label``,
    ``to_dict``/``to_json``); everything is computed in float32 (``lowrank_momentum.compression_config``).
    The profile spells it ``{"momentum_rank": rank}`` and no orthogonalizer keys.
    """

    rank: int
    method: str = MOMENTUM_RANK
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"momentum_rank: must be a positive integer, got {self.rank!r}")
        if self.method != MOMENTUM_RANK or self.dtype != "float32":
            raise ValueError("MomentumRank: method and dtype are fixed")

    def label(self) -> str:
        return f"{MOMENTUM_RANK}-r{self.rank}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": MOMENTUM_RANK, "momentum_rank": self.rank}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), sort_keys=True)


Candidate = OrthoConfig | MomentumRank


def candidate_from_dict(data: dict[str, Any]) -> Candidate:
    """A candidate from its ``to_dict`` form (a bench file's ``config``)."""
    if data.get("method") == MOMENTUM_RANK:
        return MomentumRank(int(data["momentum_rank"]))
    return OrthoConfig.from_dict(data)


def momentum_rank_of(config: Any) -> int | None:
    """The momentum rank of a candidate (None: the full momentum buffer)."""
    return config.rank if isinstance(config, MomentumRank) else None


def state_bytes(shape: Sequence[int], config: Any, dtype: torch.dtype = torch.float32) -> int:
    """Muon optimizer state one layer of ``shape`` holds under ``config`` (``optim.state_memory``).

    Every orthogonalizer keeps the full m x n momentum buffer; a ``MomentumRank`` keeps its factors. Both
    add the float32 step counter. ``dtype`` is the parameter's (bench does not know it: float32).
    """
    return muon_state_bytes(tuple(shape), momentum_rank=momentum_rank_of(config), dtype=dtype)


@dataclass(frozen=True)
class GridSpec:
    """What to bench; ``explicit`` names the axes the user set (they are not silently trimmed)."""

    methods: tuple[str, ...] = GRID_METHODS
    steps: tuple[int, ...] = DEFAULT_STEPS
    schedules: tuple[str, ...] = DEFAULT_SCHEDULES
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    ranks: tuple[int, ...] = DEFAULT_RANKS
    power_iters: tuple[int, ...] = DEFAULT_POWER_ITERS
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    explicit: frozenset[str] = field(default_factory=frozenset)
    # dtypes of the low-rank family; None: ``dtypes``. Unless --dtype is given, run_bench narrows it to
    # the dtype the device runs fastest: low-rank accuracy needs real (simulated) runs per layer and seed,
    # the bulk of a CPU bench, and bf16 vs fp32 barely moves low-rank accuracy or (on CPU) its time.
    lowrank_dtypes: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "steps": list(self.steps),
            "schedules": list(self.schedules),
            "dtypes": list(self.dtypes),
            "ranks": list(self.ranks),
            "power_iters": list(self.power_iters),
            "fractions": list(self.fractions),
            "lowrank_dtypes": list(self.lowrank_dtypes or self.dtypes),
            "explicit": sorted(self.explicit),
            "core": f"ns{CORE_STEPS}-{CORE_SCHEDULE}",
        }


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _ints(flag: str, text: str, positive: bool = True) -> tuple[int, ...]:
    values: list[int] = []
    for part in _split(text):
        try:
            value = int(part)
        except ValueError:
            raise GridError(f"{flag}: {part!r} is not an integer") from None
        if positive and value < 1:
            raise GridError(f"{flag}: must be positive, got {value}")
        if not positive and value < 0:
            raise GridError(f"{flag}: must be non-negative, got {value}")
        values.append(value)
    if not values:
        raise GridError(f"{flag}: empty list")
    return tuple(sorted(set(values)))


def parse_grid(
    methods: str | None = None,
    ranks: str | None = None,
    steps: str | None = None,
    schedules: str | None = None,
    dtypes: str | None = None,
    power_iters: str | None = None,
    fractions: str | None = None,
) -> GridSpec:
    """A GridSpec from the comma-separated CLI flags (None: the default for that axis)."""
    explicit: set[str] = set()
    spec: dict[str, Any] = {}
    if methods is not None:
        names = _split(methods)
        unknown = [m for m in names if m not in GRID_METHODS]
        if unknown or not names:
            known = ", ".join(GRID_METHODS)
            raise GridError(f"--methods: unknown method {', '.join(unknown) or '(none)'} (known: {known})")
        spec["methods"] = tuple(m for m in GRID_METHODS if m in names)
        explicit.add("methods")
    if ranks is not None:
        spec["ranks"] = _ints("--ranks", ranks)
        explicit.add("ranks")
    if steps is not None:
        spec["steps"] = _ints("--steps", steps)
        if max(spec["steps"]) > 100:
            raise GridError(f"--steps: at most 100, got {max(spec['steps'])}")
        explicit.add("steps")
    if schedules is not None:
        names = _split(schedules)
        unknown = [s for s in names if s not in SCHEDULES]
        if unknown or not names:
            known = ", ".join(sorted(SCHEDULES))
            raise GridError(f"--schedules: unknown schedule {', '.join(unknown) or '(none)'} (known: {known})")
        spec["schedules"] = tuple(dict.fromkeys(names))
        explicit.add("schedules")
    if dtypes is not None:
        names = [DTYPE_ALIASES.get(d, d) for d in _split(dtypes)]
        unknown = [d for d in names if d not in DTYPES]
        if unknown or not names:
            raise GridError(f"--dtype: unknown dtype {', '.join(unknown) or '(none)'} (use bf16, fp32)")
        spec["dtypes"] = tuple(dict.fromkeys(names))
        explicit.add("dtypes")
    if power_iters is not None:
        spec["power_iters"] = _ints("--power-iters", power_iters, positive=False)
        explicit.add("power_iters")
    if fractions is not None:
        spec["fractions"] = _fractions(fractions)
        explicit.add("fractions")
    return GridSpec(**spec, explicit=frozenset(explicit))


def _fractions(text: str) -> tuple[float, ...]:
    values: list[float] = []
    for part in _split(text):
        try:
            value = float(part)
        except ValueError:
            raise GridError(f"--fractions: {part!r} is not a number") from None
        if not 0 < value <= 1:
            raise GridError(f"--fractions: must be in (0, 1], got {part}")
        values.append(value)
    if not values:
        raise GridError("--fractions: empty list")
    return tuple(sorted(set(values)))


def candidate_label(config: Candidate) -> str:
    """``config.label()``, plus the dtype for rsvd (whose label omits it, but bench runs it in both)."""
    label = config.label()
    if config.method == "rsvd":
        label += "-bf16" if config.dtype == "bfloat16" else "-fp32"
    return label


def _config(**settings: Any) -> OrthoConfig:
    return OrthoConfig(**settings)


def build_candidates(grid: GridSpec) -> list[Candidate]:
    """Every configuration of ``grid`` (shape-independent), the baseline first, without duplicates."""
    out: list[Candidate] = [BASELINE]
    if "newton_schulz" in grid.methods:
        for dtype in grid.dtypes:
            for schedule in grid.schedules:
                out += [_config(ns_steps=s, coefficients=schedule, dtype=dtype) for s in grid.steps]
    if GRAM in grid.methods:
        for dtype in grid.dtypes:
            for schedule in grid.schedules:
                out += [_config(ns_steps=s, coefficients=schedule, dtype=dtype, gram=True) for s in grid.steps]
    if "svd" in grid.methods:
        out.append(_config(method="svd", dtype="float32"))
    for dtype in grid.lowrank_dtypes or grid.dtypes:
        core = {"ns_steps": CORE_STEPS, "coefficients": CORE_SCHEDULE, "dtype": dtype}
        for rank in grid.ranks:
            if "lowrank" in grid.methods:
                out += [_config(method="lowrank", rank=rank, power_iters=p, **core) for p in grid.power_iters]
                columns = {"range_finder": "columns", "power_iters": 0, "oversample": 0}
                out.append(_config(method="lowrank", rank=rank, **columns, **core))
            if "rsvd" in grid.methods:
                out.append(_config(method="rsvd", rank=rank, power_iters=1, dtype=dtype))
            if ERROR_FEEDBACK in grid.methods:
                # One twin per rank and family, not per power-iteration count: their one-step accuracy is
                # their plain twin's (nothing to simulate), only the timing and the multi-step figure differ.
                if "lowrank" in grid.methods:
                    ef = {"power_iters": EF_POWER_ITERS, "error_feedback": True}
                    out.append(_config(method="lowrank", rank=rank, **ef, **core))
                if "rsvd" in grid.methods:
                    out.append(_config(method="rsvd", rank=rank, power_iters=1, dtype=dtype, error_feedback=True))
        if "subset" in grid.methods:
            out += [_config(method="subset", fraction=f, **core) for f in grid.fractions]
    if MOMENTUM_RANK in grid.methods:  # float32 whatever the dtype axis says (see lowrank_momentum)
        out += [MomentumRank(rank) for rank in grid.ranks]
    return list(dict.fromkeys(out))


def fits(config: Candidate, shape: Sequence[int]) -> bool:
    """Whether ``config`` makes sense on an m x n matrix: a rank must be below min(m, n) (else it is full), and
    a full Gram Newton-Schulz must save flops on this shape (``GRAM_MAX_FLOP_RATIO``)."""
    if config.method in RANKED_METHODS and config.rank is not None:
        return config.rank < min(shape[-2], shape[-1])
    if isinstance(config, OrthoConfig) and config.method == "newton_schulz" and config.gram:
        m, n = shape[-2], shape[-1]
        plain = configured_newton_schulz_flops(m, n, config.replace(gram=False))
        return configured_newton_schulz_flops(m, n, config) <= GRAM_MAX_FLOP_RATIO * plain
    return True


def check_ranks(grid: GridSpec, shapes: Iterable[Sequence[int]]) -> tuple[GridSpec, list[str]]:
    """Drop ranks that fit no benched layer; a user-given rank that fits none is a GridError.

    Returns the narrowed grid and notes (one per default rank dropped). Ranks that fit some layers but
    not others are kept and skipped per layer (``fits``).
    """
    if not RANKED_METHODS & set(grid.methods):
        return grid, []
    shorts = [min(s[-2], s[-1]) for s in shapes]
    largest = max(shorts, default=0)
    too_big = [r for r in grid.ranks if r >= largest]
    if too_big and "ranks" in grid.explicit:
        raise GridError(
            f"--ranks: {', '.join(map(str, too_big))} not below min(m, n) of any benched layer "
            f"(largest short side: {largest})"
        )
    kept = tuple(r for r in grid.ranks if r < largest)
    notes = [f"rank {r} skipped: not below min(m, n) = {largest} of any benched layer" for r in too_big]
    return replace(grid, ranks=kept), notes
