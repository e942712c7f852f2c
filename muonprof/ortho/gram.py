"""Gram Newton-Schulz: the same odd polynomial as ``newton_schulz``, iterated on the small Gram matrix.

Source: Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz" (Dao-AILab/gram-newton-schulz, 2026; blog
dao-ailab.github.io/blog/2026/gram-newton-schulz). Facts taken from it, code our own:

- With X (m x n, m <= n, the short side first) and R = X X^T, one Newton-Schulz step
  X <- (a I + b R + c R^2) X = W X keeps every later Gram matrix a polynomial in R:
  R <- W R W. So the iteration can run on m x m matrices only, accumulating Q <- Q W, and touch the
  long side n just twice: R_0 = X X^T at the start and X <- Q X at the end. Plain Newton-Schulz pays
  two m x m x n products per step (X X^T and B X).
- Rounding is what differs. R_0 computed in low precision has eigenvalues perturbed by about the dtype's
  epsilon, some below zero; a negative eigenvalue r is multiplied by about a^2 per step (a ~ 3.4-8),
  where plain Newton-Schulz would keep recomputing the Gram matrix from X. A *restart* re-forms
  X <- Q X and R <- X X^T from the current iterate, resetting that drift, and resets Q to I.
  The reference picks restart positions that minimise the largest condition number of any Q under a
  perturbation of R's eigenvalues (``restart_autotune.py``: eigenvalues logspace(0, -10), perturbation
  -4e-4 for its float16 iteration); it recommends one restart for 5 steps, after step 2 for Polar Express.

Our restart rule (``default_restarts``): restart after every other step, (2, 4, ...), whatever the
schedule and dtype. Each segment then runs at most two steps on R, so a negative eigenvalue of the rounded
R grows by at most (a_t a_{t+1})^2 before X and R are re-formed; the reference's one restart after step 2
is the first of ours. Measured on 128 x 512 matrices with five spectra (Gaussian, log-uniform down to 1e-3
and 1e-6, harmonic, rank 16), error against float64 Newton-Schulz relative to plain Newton-Schulz's in
the same dtype, worst over spectra, for the six schedules at 3, 5 and 8 steps: every other step stays
within 4x in bf16 (2.3x but for polar_express_nanogpt) and 3.7x in fp32 (an absolute 7e-4 at 8 steps);
every third step reached 1e4x (Polar Express x5, bf16) and 30x in fp32; one restart after step 2 left Jordan
x5 at 2.2x in bf16; no restart at all diverges (NaN) at 8 steps in bf16. The reference's own criterion
(restart positions minimising cond(Q) under an eigenvalue perturbation) placed restarts, scaled to bf16's
epsilon, that left 8 Jordan steps 1e5x off in bf16, so we do not use it to place them.

Cost (``gram_newton_schulz_flops``), with m the short side, n the long side, counted as dense matmuls
(2 m k n flops per m x k x k x n product; the reference halves the symmetric ones with custom kernels,
torch does not): R_0 = X X^T and the final Q X cost 2 m^2 n each; per step, Z = b R + c R^2 costs 2 m^3
(none for a cubic step), Q <- a Q + Q Z costs 2 m^3 (none on a segment's first step, where Q = Z + a I),
and R <- W R W costs 4 m^3 (none before a restart or after the last step). A restart costs 4 m^2 n
(X <- Q X and R <- X X^T): the price of one plain step's long-side products, which is why restarts are
few. Five quintic steps with our two restarts: 12 m^2 n + 22 m^3 against plain's 20 m^2 n + 10 m^3, a saving
once n / m > 1.5: 1.21x at 1:3 and 1.29x at 1:4 by flops (the reference's one restart: 8 m^2 n + 28 m^3,
1.5x at 1:4), a loss on square matrices (34 vs 30).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .newton_schulz import newton_schulz, newton_schulz_flops, normalized_short_side
from .schedules import Triple, resolve_schedule

if TYPE_CHECKING:
    from .config import OrthoConfig

def gram_newton_schulz(
    G: Tensor,
    *,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "jordan",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
    restarts: Sequence[int] | None = None,
) -> Tensor:
    """``newton_schulz(G, ...)`` computed on the short-side Gram matrix; same shape, in ``dtype``.

    ``restarts`` are the steps *after* which X and R are re-formed from the iterate (1-based, so ``(2,)``
    restarts after the second step, the reference's ``[2]``); ``None`` takes ``default_restarts``. The
    normalization (``norm_scale`` of the schedule, ``eps``) and the transpose to the short side are
    ``newton_schulz``'s own; the input is never modified.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"gram_newton_schulz expects (m, n) or (B, m, n), got shape {tuple(G.shape)}")
    schedule = resolve_schedule(coefficients)
    rows = schedule.coefficients(steps)
    points = check_restarts(default_restarts(steps) if restarts is None else restarts, steps)
    X, tall = normalized_short_side(G, dtype, schedule, eps)
    if rows:
        X = _gram_iterate(X, rows, frozenset(points))
    return X.mT if tall else X


def _gram_iterate(X: Tensor, rows: Sequence[Triple], restarts: frozenset[int]) -> Tensor:
    """The Gram iteration on the normalized short-side-first X; ``restarts`` are 1-based step numbers."""
    fma = torch.addmm if X.ndim == 2 else torch.baddbmm
    R = X @ X.mT
    Q: Tensor | None = None
    last = len(rows) - 1
    for i, (a, b, c) in enumerate(rows):
        if i in restarts:  # i steps done: re-form the iterate and its Gram matrix
            assert Q is not None
            X = Q @ X
            R = X @ X.mT
            Q = None
        Z = R * b if c == 0.0 else fma(R, R, R, beta=b, alpha=c)  # b R + c R^2
        if Q is None:  # the segment's first step: Q = a I + Z
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:  # Q <- Q (a I + Z) = a Q + Q Z
            Q = fma(Q, Q, Z, beta=a)
        if i < last and (i + 1) not in restarts:  # R <- W R W with W = a I + Z, as (a I + Z)(a R + R Z)
            RZ = fma(R, R, Z, beta=a)
            R = fma(RZ, Z, RZ, beta=a)
    assert Q is not None
    return Q @ X


def check_restarts(restarts: Sequence[int], steps: int) -> tuple[int, ...]:
    """``restarts`` as a sorted tuple; ``ValueError`` unless they are distinct integers in [1, steps - 1]."""
    values = tuple(restarts)
    for r in values:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= steps - 1:
            raise ValueError(
                f"restart steps must be integers in [1, steps - 1] = [1, {steps - 1}] (after which step to "
                f"restart), got {list(values)!r}"
            )
    if len(set(values)) != len(values):
        raise ValueError(f"restart steps must be distinct, got {list(values)!r}")
    return tuple(sorted(values))


def default_restarts(steps: int) -> tuple[int, ...]:
    """The restart steps of our rule: after every other step, (2, 4, ...) below ``steps`` (module docstring)."""
    return tuple(range(2, steps, 2))


def gram_newton_schulz_flops(m: int, n: int, steps: int, restarts: Sequence[int] = (), cubic: bool = False) -> float:
    """Matmul flops of ``gram_newton_schulz`` on one m x n matrix (dense products; see the module docstring).

    ``cubic``: every step is cubic (c = 0), which skips the R^2 product; quintic otherwise."""
    if steps <= 0:
        return 0.0
    s, long = min(m, n), max(m, n)
    points = set(check_restarts(restarts, steps))
    tall_products = 2 + 2 * len(points)  # R_0 and the final Q X, plus X <- Q X and R <- X X^T per restart
    small = 0
    for i in range(steps):
        small += 0 if cubic else 1  # Z = b R + c R^2
        small += 0 if (i == 0 or i in points) else 1  # Q <- a Q + Q Z
        small += 2 if (i < steps - 1 and (i + 1) not in points) else 0  # R <- W R W
    return float(tall_products * 2 * s * s * long + small * 2 * s**3)


def configured_newton_schulz(G: Tensor, config: OrthoConfig) -> Tensor:
    """The Newton-Schulz ``config`` asks for, plain or Gram (``config.gram``), with its steps, schedule, dtype,
    eps and restarts: the one call every Newton-Schulz user (full, low-rank core, subset core) goes through."""
    ns = dict(steps=config.ns_steps, coefficients=config.coefficients, dtype=config.torch_dtype, eps=config.eps)
    if config.gram:
        return gram_newton_schulz(G, restarts=config.restart_steps, **ns)  # type: ignore[arg-type]
    return newton_schulz(G, **ns)  # type: ignore[arg-type]


def configured_newton_schulz_flops(m: int, n: int, config: OrthoConfig) -> float:
    """Matmul flops of ``configured_newton_schulz`` on one m x n matrix (cubic when every step is)."""
    rows = resolve_schedule(config.coefficients).coefficients(config.ns_steps)
    cubic = bool(rows) and all(c == 0.0 for _, _, c in rows)
    if config.gram:
        return gram_newton_schulz_flops(m, n, config.ns_steps, config.restart_steps, cubic)
    return newton_schulz_flops(m, n, config.ns_steps, cubic)
