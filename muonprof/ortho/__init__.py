"""Orthogonalizers for Muon-family optimizers, batched over same-shape matrices.

``orthogonalize(G, config)`` is the one entry point the optimizer and bench use; the individual
methods live in their own modules. See DESIGN.md for the family and the quality measures.
"""

from __future__ import annotations

from torch import Tensor

from .config import METHODS, PRESETS, OrthoConfig
from .exact import svd_polar
from .feedback import applied_update, subset_orthogonalize
from .gram import configured_newton_schulz, default_restarts, gram_newton_schulz, gram_newton_schulz_flops
from .lowrank import Generators, lowrank_orthogonalize, rsvd_factors, rsvd_orthogonalize
from .newton_schulz import newton_schulz
from .quality import alignment, matrix_with_spectrum, rel_err, singular_range
from .schedules import SCHEDULES, Schedule, resolve_schedule
from .spectral import model_singular_values, ns_singular_values, predict

__all__ = [
    "METHODS",
    "PRESETS",
    "SCHEDULES",
    "OrthoConfig",
    "Schedule",
    "alignment",
    "applied_update",
    "configured_newton_schulz",
    "default_restarts",
    "gram_newton_schulz",
    "gram_newton_schulz_flops",
    "lowrank_orthogonalize",
    "matrix_with_spectrum",
    "model_singular_values",
    "newton_schulz",
    "ns_singular_values",
    "orthogonalize",
    "predict",
    "rel_err",
    "resolve_schedule",
    "rsvd_factors",
    "rsvd_orthogonalize",
    "singular_range",
    "subset_orthogonalize",
    "svd_polar",
]


def orthogonalize(G: Tensor, config: OrthoConfig | None = None, *, generator: Generators = None) -> Tensor:
    """The orthogonalized update of ``G`` (``(m, n)`` or ``(B, m, n)``) under ``config``; same shape.

    The result is in the config's compute dtype (float32 for ``svd``); callers add it to parameters of
    any dtype. ``generator`` seeds the randomized methods (it must live on ``G``'s device): one for the
    whole batch, or a sequence with one per matrix.
    """
    config = config or OrthoConfig()
    if G.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects (m, n) or (B, m, n), got shape {tuple(G.shape)}")
    config.check_shape(tuple(G.shape))
    if config.method == "newton_schulz":
        return configured_newton_schulz(G, config)
    if config.method == "svd":
        return svd_polar(G)
    if config.method == "lowrank":
        return lowrank_orthogonalize(G, config, generator)
    if config.method == "subset":
        return subset_orthogonalize(G, config)
    return rsvd_orthogonalize(G, config, generator)
