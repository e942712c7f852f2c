"""Multi-step accuracy: the descent a candidate delivers over a window of consecutive gradients.

One-step alignment scores one update against one momentum. It cannot see what error feedback and subset
orthogonalization are for (DESIGN.md, "Approximations that keep the tail"): what a step did not apply is
served later. So run the candidate's *own* momentum rule and orthogonalizer over T real consecutive
gradients G_1..G_T (captured in ``spectra.window``), and compare the descent its updates deliver with
exact-polar Muon's (EMA momentum, Nesterov as configured, the SVD polar factor) on the same sequence:

    multistep_alignment = sum_t <G_t, O_t> / ||O_t||_op  /  sum_t <G_t, O*_t>

plus the per-step ratios. Each update is measured at unit operator norm, as the one-step ``alignment`` is
(DESIGN.md: the fraction of the best spectral-norm descent step): a recipe changes how big its update is as
well as where it points, and the size is the learning rate's business — the race compares candidates at a
matched update size, so the score that picks them must not reward a bigger step (Polar Express's outputs
sit above Jordan's; unnormalized, fewer-step schedules with large outputs would score above exact Muon).

The rules are the optimizer's own functions (``optim.momentum_rules`` for EMA
and the tail-keeping rule, ``ortho.applied_update``, ``optim.lowrank_momentum`` for LiMuon's low-rank
momentum), so bench scores what ProfiledMuon runs.

The gradients do not react to the candidate's updates (they were captured under the default recipe), so
this measures how well each rule serves a given stream of gradients, not the training it would produce.

``layer_multistep`` scores many candidates on one layer at the cost of one: the EMA inputs U_t of every
plain-momentum candidate are the reference's, so one SVD per step, U_t = W diag(s) Z^T, gives the
reference's <G_t, O*_t> = sum_i c_i (c_i = w_i^T G_t z_i), and every Newton-Schulz / SVD candidate's
<G_t, O_t> = sum_i p(s_i) c_i from the spectral model, without running it (bf16 rounding is not modelled,
as in the one-step ``spectral-model`` figures). The rest are run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..optim.lowrank_momentum import compress, expand, polar_of_factors
from ..optim.momentum_rules import ema_momentum, tail_decay, tail_momentum
from ..ortho import OrthoConfig, applied_update, orthogonalize
from ..ortho.exact import numerical_rank_mask
from ..ortho.spectral import model_singular_values
from .candidates import Candidate, MomentumRank, candidate_label

SPECTRAL_WINDOW = "spectral model on the window's EMA inputs"
RUN_WINDOW = "run over the window"


def _check(grads: Tensor, initial_momentum: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if grads.ndim != 3 or grads.size(0) < 1:
        raise ValueError(f"multistep: grads must be (T, m, n) with T >= 1, got shape {tuple(grads.shape)}")
    if initial_momentum is not None and tuple(initial_momentum.shape) != tuple(grads.shape[1:]):
        raise ValueError(
            f"multistep: initial momentum has shape {tuple(initial_momentum.shape)}, the gradients "
            f"{tuple(grads.shape[1:])}"
        )
    G = grads.float()
    return G, (initial_momentum.float() if initial_momentum is not None else None)


def _inner(G: Tensor, O: Tensor) -> float:
    """<G, O / ||O||_op>: the descent of the update at unit operator norm (0 for a zero update)."""
    op = _op_norm(O)
    return float(torch.sum(G.double() * O.double())) / op if op > 0 else 0.0


EXACT_OP_NORM_BELOW = 96  # short side up to which ||O||_op is an exact SVD; above, power iteration


def _op_norm(O: Tensor, iters: int = 16, block: int = 16) -> float:
    """||O||_op: exact (float64 singular values) for small matrices; above ``EXACT_OP_NORM_BELOW`` by block
    subspace iteration on O^T O (``block`` vectors, fixed seed, then Rayleigh-Ritz: a few skinny matmuls
    instead of a 768 x 3072 SVD per step); block iteration, unlike a single power vector, converges on the
    clustered spectra orthogonalizers produce (Jordan's quintic leaves them in ~[0.7, 1.2])."""
    A = O.double().reshape(O.shape[-2], O.shape[-1])
    if not bool(torch.any(A)):
        return 0.0
    if min(A.shape) <= EXACT_OP_NORM_BELOW:
        return float(torch.linalg.matrix_norm(A, ord=2))
    gen = torch.Generator(device=A.device).manual_seed(0)
    V = torch.randn(A.size(-1), min(block, min(A.shape)), generator=gen, dtype=A.dtype, device=A.device)
    for _ in range(iters):
        V = torch.linalg.qr(A.mT @ (A @ V)).Q
    return float(torch.linalg.svdvals(A @ V).max())


def _step_generator(generator: torch.Generator | None, step: int, device: torch.device) -> torch.Generator:
    """The sketch seed of window step ``step`` (0-based): ProfiledMuon's for the first layer of an optimizer
    with ``seed`` = ``generator``'s initial seed (0 without one), at optimizer step ``step + 1``."""
    base = generator.initial_seed() if generator is not None else 0
    return torch.Generator(device=device).manual_seed((base * 1_000_003 + (step + 1) * 10_007) % (2**63 - 1))


def candidate_inners(
    grads: Tensor,
    initial_momentum: Tensor | None,
    candidate: Candidate,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    generator: torch.Generator | None = None,
) -> list[float]:
    """<G_t, O_t / ||O_t||_op> per step under the candidate's own momentum rule and orthogonalizer.

    The window's momentum before G_1 is an EMA buffer B (the default recipe's); the rules start from what
    that buffer is in their own terms: B itself (EMA), E = mu B (tail-keeping, ``momentum_rules``), or the
    rank-r factors of B (``momentum_rank``; no Nesterov, as in ProfiledMuon)."""
    G, B0 = _check(grads, initial_momentum)
    mu = momentum
    zeros = torch.zeros_like(G[0])
    out: list[float] = []
    if isinstance(candidate, MomentumRank):
        factors = compress(B0 if B0 is not None else zeros, candidate.rank)
        for t, g in enumerate(G):
            M = expand(*factors).lerp_(g, 1 - mu)
            factors = compress(M, candidate.rank, generator=[_step_generator(generator, t, g.device)])
            out.append(_inner(g, polar_of_factors(*factors)))
        return out
    if candidate.keeps_tail:
        E = B0 * mu if B0 is not None else zeros.clone()
        for t, g in enumerate(G):
            X, U = tail_momentum(E, g, mu, nesterov)
            O, A = applied_update(U, X, candidate, generator=_step_generator(generator, t, g.device))
            E = tail_decay(X, A, mu)
            out.append(_inner(g, O))
        return out
    B = B0.clone() if B0 is not None else zeros.clone()
    for t, g in enumerate(G):
        U = ema_momentum(B, g, mu, nesterov)
        out.append(_inner(g, orthogonalize(U, candidate, generator=_step_generator(generator, t, g.device))))
    return out


def _spectral_steps(grads: Tensor, initial_momentum: Tensor | None, momentum: float, nesterov: bool) -> list[Any]:
    """Per step, the EMA input's spectrum s and the coefficients c_i = w_i^T G_t z_i (float64)."""
    G, B0 = _check(grads, initial_momentum)
    B = B0.clone() if B0 is not None else torch.zeros_like(G[0])
    steps = []
    for g in G:
        U = ema_momentum(B, g, momentum, nesterov)
        W, s, Zh = torch.linalg.svd(U, full_matrices=False)
        c = ((W.mT.double() @ g.double()) * Zh.double()).sum(-1)  # diag(W^T G Z)
        keep = numerical_rank_mask(s, *U.shape)
        steps.append((s.double(), c, keep))
    return steps


def _ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float | None, list[float | None]]:
    total = sum(den)
    per = [n / d if d > 0 else None for n, d in zip(num, den)]
    return (sum(num) / total if total > 0 else None), per


def _result(num: Sequence[float], den: Sequence[float], source: str, momentum: float, nesterov: bool) -> dict[str, Any]:
    overall, per = _ratio(num, den)
    return {
        "multistep_alignment": overall,
        "multistep_per_step": per,
        "multistep_steps": len(num),
        "multistep_source": f"{source} ({len(num)} steps, mu {momentum:g}, nesterov {str(nesterov).lower()})",
    }


def multistep_accuracy(
    grads: Tensor,
    initial_momentum: Tensor | None,
    candidate: Candidate,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """``multistep_alignment`` = sum_t <G_t, O_t / ||O_t||_op> / sum_t <G_t, O*_t> of ``candidate`` on ``grads``
    (``(T, m, n)``) from ``initial_momentum`` (the EMA buffer before G_1; None: zero), with the per-step
    ratios (``multistep_per_step``; None where exact Muon's descent is not positive). Runs the candidate."""
    steps = _spectral_steps(grads, initial_momentum, momentum, nesterov)
    reference = [float((c * keep).sum()) for _, c, keep in steps]
    inners = candidate_inners(
        grads, initial_momentum, candidate, momentum=momentum, nesterov=nesterov, generator=generator
    )
    return _result(inners, reference, RUN_WINDOW, momentum, nesterov)


def _spectral_inner(out: Tensor, c: Tensor) -> float:
    """<G, O / ||O||_op> when O = W diag(out) Z^T and c_i = w_i^T G z_i."""
    op = float(out.abs().max()) if out.numel() else 0.0
    return float((out * c).sum()) / op if op > 0 else 0.0


def _spectral(config: Candidate) -> bool:
    return isinstance(config, OrthoConfig) and config.method in ("newton_schulz", "svd")


def layer_multistep(
    grads: Tensor,
    initial_momentum: Tensor | None,
    candidates: Sequence[Candidate],
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """label -> ``multistep_accuracy``'s figures for every candidate on one layer's window, sharing the
    reference run; Newton-Schulz and SVD candidates come from the spectral model (module docstring)."""
    steps = _spectral_steps(grads, initial_momentum, momentum, nesterov)
    reference = [float((c * keep).sum()) for _, c, keep in steps]
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, Any]] = {}
    for config in candidates:
        label = candidate_label(config)
        if _spectral(config):
            assert isinstance(config, OrthoConfig)
            inners = [_spectral_inner(model_singular_values(s, config), c) for s, c, _ in steps]
            out[label] = _result(inners, reference, SPECTRAL_WINDOW, momentum, nesterov)
        else:
            inners = candidate_inners(
                grads, initial_momentum, config, momentum=momentum, nesterov=nesterov, generator=generator
            )
            out[label] = _result(inners, reference, RUN_WINDOW, momentum, nesterov)
    return out
