"""Accuracy: how close each candidate's update is to the exact polar factor, per layer, on its spectrum.

Three sources, cheapest first (DESIGN.md, "Two facts that make tuning cheap"):

- ``spectral-model``: Newton-Schulz and SVD act on singular values alone, so ``spectral.predict`` on
  the captured momentum spectrum is exact (in exact arithmetic) and takes microseconds.
- ``simulated (N seeds)``: Gaussian-sketch range finders (lowrank power, rsvd, and the randomized SVD
  that compresses a low-rank momentum, ``momentum_rank``) are rotation invariant,
  so running the real orthogonalizer on diag(s) gives the same error distribution as on the full
  matrix; N sketch seeds give a mean and a worst case.
- ``real matrix``: column selection is not rotation invariant (on diag(s) it would pick zero columns);
  it is measured only on the momentum matrix saved with ``--save-matrices``.

Two more, for the approximations that keep the tail (``ortho.feedback``):

- error feedback changes the momentum rule, not the step's update: its one-step figure is its plain twin's,
  copied (``same as <label>``). Its benefit shows only over many steps (``bench.multistep``).
- ``subset`` selects rows by norm, which is not rotation invariant: measured on the saved momentum when
  there is one, else on Haar-rotated m x n matrices with the captured spectrum (``HAAR``), over seeds.

``model_check`` measures what the scalar model misses: bf16 round-off in real Newton-Schulz runs.

For ``momentum_rank`` the measured update is ``polar_of_factors(*compress(M, r))``: one compression of the
captured momentum, compared with the exact polar factor of that (full) momentum. It does not model what
the low-rank momentum loses over many steps (the discarded tail is gone for good each step), so it is
the optimistic, single-step figure; ``muonprof validate`` measures the real run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..optim.lowrank_momentum import compress, polar_of_factors
from ..ortho import OrthoConfig, orthogonalize, predict
from ..ortho.exact import numerical_rank_mask
from ..ortho.quality import haar_factors, matrix_with_spectrum
from ..ortho.spectral import nonzero_mask
from .candidates import Candidate, MomentumRank, candidate_label

SPECTRAL = "spectral-model"
REAL = "real matrix"
NEEDS_MATRICES = "needs --save-matrices"
HAAR = "simulated on Haar-rotated matrices with the captured spectrum"
MEASURES = ("rel_err", "alignment", "sv_min", "sv_max")
MODEL_CHECK_CONFIGS: tuple[OrthoConfig, ...] = (
    OrthoConfig(),  # Jordan x 5, bf16: the default
    OrthoConfig(ns_steps=5, coefficients="polar_express"),
    OrthoConfig(ns_steps=3, coefficients="jordan"),
)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on CPU while measuring accuracy; restore the default afterwards.

    Captured spectra span 10+ orders of magnitude (early-training momentum of attention layers reaches
    1e-11), and on diag(s), or a real momentum with tiny entries, the fifth powers in Newton-Schulz land
    in the subnormal range, where x86 arithmetic is 10-100x slower: one bench of GPT-2-small took 10x
    longer for it. Values below 1e-38 change no measure we report.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def simulated(seeds: int) -> str:
    return f"simulated ({seeds} seeds)"


def source_for(config: Candidate) -> str:
    """Which of the three sources measures ``config`` (``simulated`` without its seed count)."""
    if isinstance(config, MomentumRank):
        return "simulated"
    if config.method == "subset":
        return HAAR
    if config.method in ("newton_schulz", "svd"):
        return SPECTRAL
    if config.method == "lowrank" and config.range_finder == "columns":
        return REAL
    return "simulated"


def spectral_accuracy(s: Tensor, config: OrthoConfig) -> dict[str, Any]:
    """The spectral model's measures; worst = mean, since nothing is random."""
    out = predict(s, config)
    return {**out, "alignment_worst": out["alignment"], "rel_err_worst": out["rel_err"], "source": SPECTRAL}


def output_singular_values(O: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """Singular values (float32, descending) of an update ``O`` of rank <= ``rank``, in O(mn rank).

    A full SVD of each simulated update would cost more than the orthogonalizer itself. O has rank at
    most ``rank`` by construction (a product through an m x rank basis), so a Gaussian sketch Y = O W
    with a few extra columns spans its range, and O's singular values are those of the small B = Q_Y^T O,
    read off the eigenvalues of the tiny Gram B B^T (float32 is plenty for a range around 1; B's own SVD
    when that eigensolver does not converge).
    """
    Of = O.float()
    width = min(rank + 8, min(Of.shape[-2:]))
    W = torch.randn(Of.size(-1), width, generator=generator, device=Of.device)
    Q = torch.linalg.qr(Of @ W).Q
    B = Q.mT @ Of
    try:
        ev = torch.linalg.eigvalsh(B @ B.mT).clamp(min=0).sqrt().flip(-1)
    except torch.linalg.LinAlgError:
        # LAPACK's syevd can fail to converge on a Gram with many (near-)repeated tiny eigenvalues (a rank-r
        # update of a nearly rank-r momentum): the small B's SVD in float64 always converges.
        ev = torch.linalg.svdvals(B.double()).float()
    return ev[:rank]


def _measures(inner: float, nuclear: float, err: float, ref: float, sv: Tensor, keep: int) -> dict[str, float]:
    """rel_err, alignment and the range of the top ``keep`` singular values from their ingredients."""
    top = sv[:keep] if keep > 0 else sv
    op = float(sv.max()) if sv.numel() else 0.0
    return {
        "rel_err": err / ref if ref > 0 else err,
        "alignment": inner / (nuclear * op) if nuclear > 0 and op > 0 else 0.0,
        "sv_min": float(top.min()) if top.numel() else 0.0,
        "sv_max": float(top.max()) if top.numel() else 0.0,
    }


def _summarize(runs: Sequence[dict[str, float]], source: str) -> dict[str, Any]:
    """Mean of each measure over seeds, plus the worst alignment (lowest) and rel_err (highest)."""
    out: dict[str, Any] = {k: sum(r[k] for r in runs) / len(runs) for k in MEASURES}
    out["alignment_worst"] = min(r["alignment"] for r in runs)
    out["rel_err_worst"] = max(r["rel_err"] for r in runs)
    out["sv_min"] = min(r["sv_min"] for r in runs)
    out["sv_max"] = max(r["sv_max"] for r in runs)
    out["source"] = source
    return out


def momentum_rank_update(G: Tensor, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """The update a rank-``rank`` low-rank momentum ``G`` gives: U V^T of its randomized-SVD factors."""
    return polar_of_factors(*compress(G, rank, generator=generator))


def simulate_accuracy(
    s: Tensor, config: Candidate, *, seeds: int = 3, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Run the real (randomized) ``config`` on diag(s), a k x k matrix (k = len(s)), with ``seeds`` sketches.

    Why diag(s) and why k x k are enough: a Gaussian sketch is rotation invariant (U^T G Omega has the
    distribution of diag(s) V^T Omega, and V^T Omega is again Gaussian), so the error distribution on
    any matrix with spectrum s equals that on diag(s). On the m x n diag(s) all work happens in the
    leading k x k block (the orthogonalizer orients the matrix wide, and the rows of the sketch that
    meet the zero columns only ever multiply zeros), so the k x k diag(s) gives the same result, seed
    for seed (torch draws the first k rows of an n x w sketch from the same generator state), at k/l of
    the cost. The polar factor of diag(s) is the diagonal 0/1 mask, so no SVD of G is needed either.
    A ``MomentumRank`` candidate runs ``polar_of_factors(*compress(diag(s), r))`` the same way (its
    compression is the same float32 Gaussian-sketch randomized SVD, normalized by a rotation-invariant
    Frobenius norm).
    """
    device = torch.device(device)
    x = torch.sort(torch.as_tensor(s, dtype=torch.float64).clamp(min=0), descending=True).values
    keep = nonzero_mask(x)
    G = torch.diag(x).to(device=device, dtype=torch.float32)
    P = torch.diag(keep.to(torch.float32)).to(device)
    xf = x.to(device=device, dtype=torch.float32)
    ref = math.sqrt(float(keep.sum()))
    nuclear = float(x.sum())
    rank = config.rank or x.numel()
    gen = torch.Generator(device=device)
    sketch = torch.Generator(device=device).manual_seed(12345)
    runs = []
    for seed in range(seeds):
        if isinstance(config, MomentumRank):
            O = momentum_rank_update(G, config.rank, generator=gen.manual_seed(seed))
        else:
            O = orthogonalize(G, config, generator=gen.manual_seed(seed)).float()
        inner = float(torch.sum(torch.diagonal(O) * xf, dtype=torch.float64))
        err = float(torch.linalg.matrix_norm(O - P))
        sv = output_singular_values(O, rank, sketch).cpu()
        runs.append(_measures(inner, nuclear, err, ref, sv, min(rank, int(keep.sum()))))
    return _summarize(runs, simulated(seeds))


class RealMatrix:
    """A saved momentum matrix with its exact polar factor and nuclear norm, computed once per layer.

    float32 SVD: the measures need the polar factor to ~1e-6, not to float64 precision, and the float32
    SVD of a 768 x 3072 matrix is several times faster.
    """

    def __init__(self, M: Tensor, device: torch.device | str = "cpu") -> None:
        self.M = M.to(device=device, dtype=torch.float32)
        U, S, Vh = torch.linalg.svd(self.M, full_matrices=False)
        keep = numerical_rank_mask(S, *self.M.shape)
        self.P = (U * keep.to(U.dtype)) @ Vh
        self.nuclear = float(S.double().sum())
        self.ref = math.sqrt(float(keep.sum()))
        self.rank = int(keep.sum())


def real_matrix_accuracy(
    real: RealMatrix, config: OrthoConfig, *, seeds: int = 3, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Run ``config`` (column selection) on the saved matrix with ``seeds`` column draws."""
    gen = torch.Generator(device=torch.device(device))
    sketch = torch.Generator(device=torch.device(device)).manual_seed(12345)
    rank = config.rank or min(real.M.shape)
    runs = []
    for seed in range(seeds):
        O = orthogonalize(real.M, config, generator=gen.manual_seed(seed)).float()
        inner = float(torch.sum(real.M * O, dtype=torch.float64))
        err = float(torch.linalg.matrix_norm(O - real.P))
        sv = output_singular_values(O, rank, sketch).cpu()
        runs.append(_measures(inner, real.nuclear, err, real.ref, sv, min(rank, real.rank)))
    return _summarize(runs, REAL + (f" ({seeds} seeds)" if seeds > 1 else ""))


def haar_accuracy(
    s: Tensor, shape: tuple[int, int], config: OrthoConfig, *, seeds: int = 3, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Run ``config`` on ``seeds`` m x n matrices U diag(s) V^T with Haar-random U, V (float32 storage).

    For orthogonalizers that are not rotation invariant (subset's row selection by norm) when no real matrix
    was saved: the spectrum is the captured one, the singular vectors are a guess (generic ones), so the
    figure is what the spectrum allows on a typical matrix, not on this layer's. U V^T is known, so no SVD.
    """
    m, n = shape
    k = min(m, n)
    x = torch.sort(torch.as_tensor(s, dtype=torch.float64).clamp(min=0), descending=True).values
    x = torch.cat([x[:k], x.new_zeros(max(0, k - x.numel()))])  # a spectrum of min(m, n) values
    keep = nonzero_mask(x)
    ref = math.sqrt(float(keep.sum()))
    nuclear = float(x.sum())
    sketch = torch.Generator(device=torch.device(device)).manual_seed(12345)
    runs = []
    for seed in range(seeds):
        U, V = haar_factors(m, n, generator=torch.Generator().manual_seed(seed))
        G = ((U * x) @ V.mT).to(device=device, dtype=torch.float32)
        P = ((U * keep.to(U.dtype)) @ V.mT).to(device=device, dtype=torch.float32)
        O = orthogonalize(G, config).float()
        inner = float(torch.sum(G * O, dtype=torch.float64))
        err = float(torch.linalg.matrix_norm(O - P))
        sv = output_singular_values(O, k, sketch).cpu()
        runs.append(_measures(inner, nuclear, err, ref, sv, int(keep.sum())))
    return _summarize(runs, f"{HAAR} ({seeds} seeds)")


def _plain_twin(config: Candidate) -> OrthoConfig | None:
    """The same orthogonalizer without error feedback (whose one-step update it is), or None."""
    if isinstance(config, OrthoConfig) and config.error_feedback:
        return config.replace(error_feedback=False)
    return None


@flush_denormals()
def layer_accuracy(
    s: Tensor,
    candidates: Sequence[Candidate],
    *,
    seeds: int = 3,
    device: torch.device | str = "cpu",
    matrix: Tensor | None = None,
    tick: Callable[[], None] | None = None,
    shape: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """label -> measures for every candidate on one layer (candidates must fit the layer's shape).

    ``matrix`` is the saved momentum (None: column selection is marked ``needs --save-matrices``).
    ``shape`` is the layer's matrix shape, for the Haar simulation of subset (None: the saved matrix's, else
    square k x k). Newton-Schulz's prediction does not depend on the dtype, so it is computed once per
    (steps, schedule); an error-feedback candidate copies its plain twin's figures.
    """
    out: dict[str, dict[str, Any]] = {}
    model_cache: dict[str, dict[str, Any]] = {}
    twins: dict[str, dict[str, Any]] = {}
    real: RealMatrix | None = None
    if shape is None:
        shape = tuple(matrix.shape) if matrix is not None else (len(s), len(s))  # type: ignore[assignment]
    assert shape is not None
    for config in candidates:
        label = candidate_label(config)
        twin = _plain_twin(config)
        if twin is not None:
            twin_label = candidate_label(twin)
            if twin_label not in twins:
                twins[twin_label] = layer_accuracy(s, [twin], seeds=seeds, device=device, matrix=matrix, shape=shape)[
                    twin_label
                ]
            measures = dict(twins[twin_label])
            if "alignment" in measures:
                measures["source"] = f"same as {twin_label} (error feedback changes the momentum, not the update)"
            out[label] = measures
            if tick is not None:
                tick()
            continue
        source = source_for(config)
        if source == HAAR:
            assert isinstance(config, OrthoConfig)
            if matrix is not None:
                real = real or RealMatrix(matrix, device)
                out[label] = real_matrix_accuracy(real, config, seeds=1, device=device)
            else:
                out[label] = haar_accuracy(s, shape, config, seeds=seeds, device=device)
        elif source == SPECTRAL:
            assert isinstance(config, OrthoConfig)
            key = config.replace(dtype="float32").to_json()
            if key not in model_cache:
                model_cache[key] = spectral_accuracy(s, config)
            out[label] = dict(model_cache[key])
        elif source == REAL:
            if matrix is None:
                out[label] = {"source": NEEDS_MATRICES}
            else:
                real = real or RealMatrix(matrix, device)
                out[label] = real_matrix_accuracy(real, config, seeds=seeds, device=device)
        else:
            out[label] = simulate_accuracy(s, config, seeds=seeds, device=device)
        if tick is not None:
            tick()
    return out


def snapshot_accuracy(
    snapshots: Sequence[tuple[int, Tensor]],
    candidates: Sequence[Candidate],
    *,
    seeds: int = 3,
    device: torch.device | str = "cpu",
    matrix: Tensor | None = None,
    matrix_step: int | None = None,
    tick: Callable[[], None] | None = None,
    shape: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """label -> measures on one layer, each the worst over its momentum spectra at several steps.

    Why the worst: a recipe is used for the whole run, and the spectra move as training goes on (early
    spectra are lower-rank, which flatters low-rank recipes). ``snapshots`` are (step, spectrum) pairs;
    per candidate ``alignment``/``alignment_worst``/``sv_min`` are the minimum and ``rel_err``/
    ``rel_err_worst``/``sv_max`` the maximum over snapshots (other keys come from the lowest-alignment
    snapshot), ``worst_step`` names that snapshot and ``snapshots`` lists each one's step, alignment and
    rel_err. Column selection needs the real matrix, saved at ``matrix_step`` only: it is measured there.
    ``tick`` is called once per candidate and snapshot; ``shape`` goes to ``layer_accuracy`` (subset's Haar
    simulation needs the layer's matrix shape).
    """
    if not snapshots:
        raise ValueError("snapshot_accuracy needs at least one (step, spectrum) snapshot")
    steps = [step for step, _ in snapshots]
    real_at = matrix_step if matrix is not None and matrix_step in steps else steps[-1]
    per_step: list[tuple[int, dict[str, dict[str, Any]]]] = []
    for step, s in snapshots:
        here = [c for c in candidates if source_for(c) != REAL or step == real_at]
        mat = matrix if step == real_at else None
        per_step.append((step, layer_accuracy(s, here, seeds=seeds, device=device, matrix=mat, tick=tick, shape=shape)))
    out: dict[str, dict[str, Any]] = {}
    for config in candidates:
        label = candidate_label(config)
        measured = [(step, table[label]) for step, table in per_step if "alignment" in table.get(label, {})]
        if not measured:  # e.g. needs --save-matrices: report what the last snapshot said
            out[label] = next(table[label] for _, table in reversed(per_step) if label in table)
            continue
        out[label] = worst_over_snapshots(measured)
    return out


def snapshot_work(candidates: Sequence[Candidate], snapshots: int) -> int:
    """How many ``tick`` calls ``snapshot_accuracy`` makes (column selection runs on one snapshot only)."""
    return sum(1 if source_for(c) == REAL else snapshots for c in candidates)


def worst_over_snapshots(measured: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Combine one candidate's per-snapshot measures into their worst (see ``snapshot_accuracy``)."""
    worst_step, worst = min(measured, key=lambda item: item[1]["alignment"])
    out = dict(worst)
    for keys, pick in (
        (("alignment", "alignment_worst", "sv_min"), min),
        (("rel_err", "rel_err_worst", "sv_max"), max),
    ):
        for key in keys:
            out[key] = pick(m[key] for _, m in measured)
    out["worst_step"] = worst_step
    out["snapshots"] = [{"step": step, "alignment": m["alignment"], "rel_err": m["rel_err"]} for step, m in measured]
    return out


@flush_denormals()
def model_check(
    layers: Sequence[tuple[str, tuple[int, int], Tensor]],
    *,
    configs: Sequence[OrthoConfig] = MODEL_CHECK_CONFIGS,
    device: torch.device | str = "cpu",
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Real Newton-Schulz runs on U diag(s) V^T (float32 storage) vs the spectral model's prediction.

    ``layers`` are (name, (m, n), spectrum). The gap is the max |measured - predicted| of alignment and
    of rel_err over all layers and configs: the error bar on every spectral-model number in the artifact.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, (m, n), s in layers:
        x = torch.sort(torch.as_tensor(s, dtype=torch.float64), descending=True).values
        Gd = matrix_with_spectrum(x, m, n, generator=gen)
        U, S, Vh = torch.linalg.svd(Gd, full_matrices=False)
        P = (U * nonzero_mask(S).to(U.dtype)) @ Vh
        G = Gd.to(device=device, dtype=torch.float32)
        Gd, P = Gd.to(device), P.to(device)
        ref = math.sqrt(float(nonzero_mask(x).sum()))
        nuclear = float(x.sum())
        for config in configs:
            O = orthogonalize(G, config).double()
            sv = torch.linalg.svdvals(O)
            err = float(torch.linalg.matrix_norm(O - P))
            measured = _measures(float((Gd * O).sum()), nuclear, err, ref, sv.cpu(), 0)
            predicted = predict(x, config)
            rows.append(
                {
                    "layer": name,
                    "shape": [m, n],
                    "label": candidate_label(config),
                    "measured": {k: measured[k] for k in ("rel_err", "alignment")},
                    "predicted": {k: predicted[k] for k in ("rel_err", "alignment")},
                    "gap_alignment": abs(measured["alignment"] - predicted["alignment"]),
                    "gap_rel_err": abs(measured["rel_err"] - predicted["rel_err"]),
                }
            )
            if tick is not None:
                tick()
    return {
        "layers": sorted({r["layer"] for r in rows}),
        "configs": [candidate_label(c) for c in configs],
        "rows": rows,
        "max_gap_alignment": max((r["gap_alignment"] for r in rows), default=None),
        "max_gap_rel_err": max((r["gap_rel_err"] for r in rows), default=None),
        "storage": "float32 input, U diag(s) V^T with Haar-random U, V",
    }
