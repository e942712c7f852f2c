"""Newton-Schulz coefficient schedules, each shipped with the normalization it was designed for.

A schedule is a list of odd-polynomial coefficients ``(a, b, c)`` acting on singular values as
``x -> a x + b x^3 + c x^5`` (``c = 0`` for a cubic). Step ``t`` uses row ``t`` and steps past the end
of the table repeat the last row, which is how every implementation we know extends its table.

Why the normalization travels with the table: Polar Express designs its polynomials for inputs in
``[l, 1]`` and then divides the input by ``1.01 * ||X||_F`` (or ``1.02`` for the 5-row table) so that
bf16 round-off cannot push a singular value past 1, where the steep first polynomial blows up. Using
the table with plain ``||X||_F`` normalization silently loses that margin, so a schedule name always
means "these rows *and* this input scale".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Schedule:
    """A named coefficient table plus the input scale it assumes (divide X by ``norm_scale * ||X||_F``)."""

    name: str
    rows: tuple[Triple, ...]
    norm_scale: float = 1.0
    source: str = ""

    def coefficients(self, steps: int) -> list[Triple]:
        """The ``steps`` triples actually applied, repeating the last row past the end of the table."""
        if steps <= len(self.rows):
            return list(self.rows[:steps])
        return list(self.rows) + [self.rows[-1]] * (steps - len(self.rows))


def _with_safety(rows: Sequence[Triple], factor: float) -> tuple[Triple, ...]:
    """Polar Express's safety margin: p(x) -> p(x / factor) on every polynomial except the last."""
    safe = [(a / factor, b / factor**3, c / factor**5) for a, b, c in rows[:-1]]
    return (*safe, tuple(rows[-1]))  # type: ignore[return-value]


# Raw Polar Express table (Amsel, Persson, Musco, Gower, arXiv 2505.16932, Algorithm 1: d=5, l=1e-3).
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule(
            "jordan",
            ((3.4445, -4.7750, 2.0315),),
            1.0,
            "Keller Jordan's quintic; torch.optim.Muon's default. Plateaus in about [0.68, 1.2].",
        ),
        Schedule("cubic", ((1.5, -0.5, 0.0),), 1.0, "Classical cubic Newton-Schulz; converges to 1."),
        Schedule(
            "quintic",
            ((15 / 8, -10 / 8, 3 / 8),),
            1.0,
            "Classical (Taylor) quintic Newton-Schulz, Kim & Oh's kappa=2; converges to 1.",
        ),
        Schedule(
            "you",
            (
                (4.0848, -6.8946, 2.9270),
                (3.9505, -6.3029, 2.6377),
                (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046),
                (2.8366, -3.0525, 1.2012),
            ),
            1.0,
            "You Jiacheng / Cesista 5-step table (modded-nanogpt train_gpt_medium.py, Dion NS5).",
        ),
        Schedule(
            "polar_express",
            _with_safety(_POLAR_EXPRESS_RAW, 1.01),
            1.01,
            "Polar Express paper's 8-row table, safety factor 1.01 on all but the last row, "
            "input divided by 1.01*||X||_F (the paper's Algorithm 1).",
        ),
        Schedule(
            "polar_express_nanogpt",
            (
                (8.156554524902461, -22.48329292557795, 15.878769915207462),
                (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
            ),
            1.02,
            "Polar Express 5-row table (safety 2e-2, cushion 0.02) as used by modded-nanogpt and Dion, "
            "input divided by 1.02*||X||_F.",
        ),
    )
}


def resolve_schedule(coefficients: str | Sequence[Sequence[float]]) -> Schedule:
    """A schedule from a registered name or from explicit per-step rows ``[a, b]`` or ``[a, b, c]``."""
    if isinstance(coefficients, str):
        try:
            return SCHEDULES[coefficients]
        except KeyError:
            names = ", ".join(sorted(SCHEDULES))
            raise ValueError(f"unknown coefficient schedule {coefficients!r} (known: {names})") from None
    rows: list[Triple] = []
    for row in coefficients:
        values = [float(v) for v in row]
        if len(values) not in (2, 3):
            raise ValueError(f"each coefficient row needs 2 or 3 numbers [a, b, c], got {list(row)!r}")
        if len(values) == 2:
            values.append(0.0)
        rows.append((values[0], values[1], values[2]))
    if not rows:
        raise ValueError("explicit coefficients need at least one row [a, b, c]")
    return Schedule("custom", tuple(rows), 1.0, "explicit coefficients")
