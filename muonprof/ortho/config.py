"""The orthogonalizer configuration: one small, hashable, JSON-round-trippable object.

Hashable because ProfiledMuon batches layers by ``(shape, dtype, config)``; JSON because the same object
is what bench measures, tune chooses and the profile stores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch

from .gram import check_restarts, default_restarts
from .schedules import resolve_schedule

Method = Literal["newton_schulz", "svd", "lowrank", "rsvd", "subset"]
METHODS: tuple[str, ...] = ("newton_schulz", "svd", "lowrank", "rsvd", "subset")
FEEDBACK_METHODS: tuple[str, ...] = ("lowrank", "rsvd")  # the ones ``error_feedback`` applies to
RANGE_FINDERS: tuple[str, ...] = ("power", "columns")
CORES: tuple[str, ...] = ("newton_schulz", "svd")
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class OrthoConfig:
    """How one matrix (or a batch of same-shape matrices) is orthogonalized.

    Fields that do not apply to ``method`` are ignored by it (``rank`` means nothing to ``svd``), but
    are still validated so that a typo in a profile is reported rather than silently dropped.

    - ``ns_steps`` / ``coefficients`` / ``dtype``: the Newton-Schulz iteration; for ``lowrank`` with
      ``core="newton_schulz"`` they drive the iteration on the small r x n core.
    - ``rank``: target rank for ``lowrank`` / ``rsvd`` (required by them).
    - ``range_finder``: ``power`` (Gaussian sketch + ``power_iters`` re-orthogonalized passes, ``oversample``
      extra columns, truncated back to ``rank``) or ``columns`` (QR of ``rank`` random columns, He et al.).
    - ``full_below``: layers whose short side is <= this get full Newton-Schulz instead of the low-rank
      path (the low-rank Muon reference code uses 500); 0 disables the gate.
    - ``error_feedback`` (``lowrank`` / ``rsvd`` only): the optimizer keeps in the momentum the part of it the
      rank-r update did not apply and decays only the applied part (Dion); see ``ortho.feedback``. It does
      not change the one-step update, only the momentum rule.
    - ``fraction`` (``subset`` only, in (0, 1]): Dion2-style subset orthogonalization: each step the
      ceil(fraction x long side) rows (or columns, whichever is the long side) of the input with the largest
      norms are orthogonalized by ``core`` (Newton-Schulz with ``ns_steps`` / ``coefficients`` / ``dtype``, or
      SVD), the rest of the update is zero, and only those rows of the momentum decay.
    - ``gram``: run the Newton-Schulz iteration (of ``newton_schulz``, or the Newton-Schulz core of ``lowrank``
      / ``subset``) as Gram Newton-Schulz (``ortho.gram``): the same polynomial on the short-side Gram matrix,
      fewer flops on rectangular matrices, different rounding. ``gram_restarts``: the steps after which it
      re-forms X and its Gram matrix (1-based, each in [1, ns_steps - 1]); None takes the default rule,
      after every other step (``gram.default_restarts``).
    """

    method: Method = "newton_schulz"
    ns_steps: int = 5
    coefficients: str | tuple[tuple[float, ...], ...] = "jordan"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    eps: float = 1e-7
    rank: int | None = None
    range_finder: Literal["power", "columns"] = "power"
    power_iters: int = 1
    oversample: int = 8
    core: Literal["newton_schulz", "svd"] = "newton_schulz"
    full_below: int = 0
    error_feedback: bool = False
    fraction: float | None = None
    gram: bool = False
    gram_restarts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.coefficients, str):
            rows = tuple(tuple(float(v) for v in row) for row in self.coefficients)
            object.__setattr__(self, "coefficients", rows)
        if isinstance(self.fraction, int) and not isinstance(self.fraction, bool):
            object.__setattr__(self, "fraction", float(self.fraction))  # 1 and 1.0: one config, one hash
        if isinstance(self.gram_restarts, list | tuple):
            object.__setattr__(self, "gram_restarts", tuple(self.gram_restarts))  # lists from JSON: hashable
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field; shape-dependent checks live in ``check_shape``."""
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.ns_steps, int) or isinstance(self.ns_steps, bool) or not 0 <= self.ns_steps <= 100:
            raise ValueError(f"ns_steps: must be an integer in [0, 100], got {self.ns_steps!r}")
        try:
            resolve_schedule(self.coefficients)
        except ValueError as err:
            raise ValueError(f"coefficients: {err}") from None
        if not self.eps > 0:
            raise ValueError(f"eps: must be > 0, got {self.eps!r}")
        if self.range_finder not in RANGE_FINDERS:
            raise ValueError(f"range_finder: must be one of {', '.join(RANGE_FINDERS)}, got {self.range_finder!r}")
        if self.core not in CORES:
            raise ValueError(f"core: must be one of {', '.join(CORES)}, got {self.core!r}")
        for name in ("power_iters", "oversample", "full_below"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"rank: must be a positive integer, got {self.rank!r}")
        if self.method in ("lowrank", "rsvd") and self.rank is None:
            raise ValueError(f"rank: method {self.method!r} needs a rank")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback: must be true or false, got {self.error_feedback!r}")
        if self.error_feedback and self.method not in FEEDBACK_METHODS:
            why = " (subset keeps its unselected rows anyway)" if self.method == "subset" else ""
            raise ValueError(
                f"error_feedback: applies to the low-rank methods ({', '.join(FEEDBACK_METHODS)}) only, "
                f"not to {self.method!r}{why}"
            )
        self._validate_fraction()
        self._validate_gram()

    def _validate_gram(self) -> None:
        if not isinstance(self.gram, bool):
            raise ValueError(f"gram: must be true or false, got {self.gram!r}")
        if self.gram and not self.runs_newton_schulz:
            raise ValueError(
                "gram: applies to Newton-Schulz only (method newton_schulz, or lowrank / subset with core "
                f"newton_schulz), not to method {self.method!r}" + (f" with core {self.core!r}" if self.method in (
                    "lowrank", "subset") else "")
            )
        if self.gram_restarts is None:
            return
        if not self.gram:
            raise ValueError("gram_restarts: applies only with gram: true")
        if not isinstance(self.gram_restarts, tuple):
            raise ValueError(f"gram_restarts: must be a list of step numbers, got {self.gram_restarts!r}")
        try:
            check_restarts(self.gram_restarts, self.ns_steps)
        except ValueError as err:
            raise ValueError(f"gram_restarts: {err}") from None
        if list(self.gram_restarts) != sorted(self.gram_restarts):
            raise ValueError(f"gram_restarts: must be in increasing order, got {list(self.gram_restarts)!r}")

    @property
    def runs_newton_schulz(self) -> bool:
        """Whether a Newton-Schulz iteration is part of this method (the only place ``gram`` means anything)."""
        return self.method == "newton_schulz" or (self.method in ("lowrank", "subset") and self.core == "newton_schulz")

    @property
    def restart_steps(self) -> tuple[int, ...]:
        """The Gram restarts this config runs: ``gram_restarts``, or the default rule for ``ns_steps``."""
        if self.gram_restarts is not None:
            return self.gram_restarts
        return default_restarts(self.ns_steps)

    def _validate_fraction(self) -> None:
        f = self.fraction
        if f is None:
            if self.method == "subset":
                raise ValueError("fraction: method 'subset' needs a fraction in (0, 1]")
            return
        if self.method != "subset":
            raise ValueError(f"fraction: applies to method 'subset' only, not to {self.method!r}")
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise ValueError(f"fraction: must be a number in (0, 1], got {f!r}")

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Shape-dependent validity: a rank larger than the matrix's short side is an error, not a clamp."""
        if self.method in ("lowrank", "rsvd") and self.rank is not None:
            short = min(shape[-2], shape[-1])
            gated = self.method == "lowrank" and short <= self.full_below
            if self.rank > short and not gated:
                raise ValueError(f"rank: {self.rank} exceeds min(m, n) = {short} of a {shape[-2]}x{shape[-1]} matrix")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not isinstance(self.coefficients, str):
            data["coefficients"] = [list(row) for row in self.coefficients]
        if self.gram_restarts is not None:
            data["gram_restarts"] = list(self.gram_restarts)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrthoConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown orthogonalizer setting(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        if "coefficients" in values and not isinstance(values["coefficients"], str):
            values["coefficients"] = tuple(tuple(row) for row in values["coefficients"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> OrthoConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> OrthoConfig:
        return replace(self, **changes)

    def label(self) -> str:
        """A short human-readable name, e.g. ``ns5-jordan-bf16`` or ``lowrank-r96-power1-ns5-jordan-fp32``.

        Gram Newton-Schulz reads ``gns5-jordan-bf16`` (default restarts) or ``gns5-jordan-bf16-rs2.3`` (explicit
        ``gram_restarts``; ``-rs`` alone: none)."""
        dt = {"bfloat16": "bf16", "float32": "fp32"}[self.dtype]
        coeffs = self.coefficients if isinstance(self.coefficients, str) else "custom"
        ns = f"{'g' if self.gram else ''}ns{self.ns_steps}-{coeffs}-{dt}"
        if self.gram_restarts is not None:
            ns += "-rs" + ".".join(map(str, self.gram_restarts))
        if self.method == "newton_schulz":
            return ns
        if self.method == "svd":
            return "svd"
        core = ns if self.core == "newton_schulz" else "svd"
        if self.method == "subset":
            return f"subset-f{self.fraction:g}-{core}"
        ef = "-ef" if self.error_feedback else ""
        if self.method == "rsvd":
            return f"rsvd-r{self.rank}-p{self.power_iters}-o{self.oversample}{ef}"
        finder = f"power{self.power_iters}" if self.range_finder == "power" else "cols"
        gate = f"-full<={self.full_below}" if self.full_below else ""
        return f"lowrank-r{self.rank}-{finder}-{core}{gate}{ef}"

    @property
    def keeps_tail(self) -> bool:
        """Whether the momentum keeps what the update did not apply (error feedback or subset)."""
        return self.error_feedback or self.method == "subset"


# Named recipes. A profile entry may say {"preset": NAME, ...overrides}.
PRESETS: dict[str, OrthoConfig] = {
    # torch.optim.Muon 2.13: Jordan's quintic, 5 steps, bf16, X / max(||X||_F, 1e-7).
    "torch_default": OrthoConfig(),
    # The low-rank Muon reference code (dengzhanwang/Low-rank-Muon, train_gpt_small.py): orient wide,
    # r uniformly random columns, QR in fp32, 5 Jordan steps in bf16 on the r x n core, lift by Q,
    # short side <= 500 -> full Newton-Schulz, no rescaling of the rank-r update. k=100 is that
    # script's rank; other scripts of the repo use 200 or 400, so override ``rank`` as needed.
    "lowrank_he2025": OrthoConfig(
        method="lowrank",
        rank=100,
        range_finder="columns",
        power_iters=0,
        oversample=0,
        core="newton_schulz",
        ns_steps=5,
        coefficients="jordan",
        dtype="bfloat16",
        full_below=500,
    ),
}
