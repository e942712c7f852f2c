"""Stage 3: race stage 1's candidates against the default recipe in real training before a profile ships.

Stage 1 scores recipes with a model (one-step or multi-step alignment on captured spectra); only training
can say whether a cheaper recipe trains as well. The race:

- **Contenders**: the default recipe (torch.optim.Muon's Jordan x5 everywhere) plus up to K profiles from
  stage 1's Pareto front, spread over the predicted speedups (the stage-1 pick always among them), plus
  ``same-math``: every layer on its fastest option with the default's own polynomial (fp32 instead of bf16,
  or the Gram form), where that is predicted faster. Stage 1's model ranks it below recipes it scores as more
  accurate, so it is never on the front; but it changes only rounding, and it is the candidate most likely to
  hold the default's loss at every horizon.
- **Same LR treatment for all.** Stage 2 tunes the learning rates *of the default recipe*; those scales are
  applied to every contender. On top, each candidate layer's lr is scaled so that the spectral model's
  predicted update size ``||O||_F`` on that layer's captured momentum spectrum equals the default recipe's
  (``update_size_factors``): a recipe changes how big the update is, not only its direction (Jordan x5's
  ``||O||_F`` is ~0.6 of the exact polar factor's, Polar Express x5's ~17% above Jordan's, a rank-r update's
  ~sqrt(r)), and at one shared lr a "more accurate" recipe is mostly a bigger step. Tuning each candidate's
  LR separately would cost a stage 2 per candidate and make "the recipe wins" indistinguishable from "its
  LR was tuned"; matching the update size costs nothing and keeps the default's tuned step size.
- **Same init, same batches, paired seeds**: every (contender, seed) run builds the workload from that seed,
  so the per-seed difference cancels the seed's luck (``muonprof.stats``).
- **Successive halving on the horizon**: rung i trains the surviving candidates for ``horizons[i]`` steps
  (the last rung is the race horizon); after a rung, candidates shown *worse* than the default are dropped,
  then the best ``ceil(n / eta)`` by the upper bound of their paired difference go on. Each run trains from
  scratch (the learning rate is constant, so a longer run passes through the shorter one's states exactly);
  the default trains once per seed to the full horizon and is read at every rung.
- **Verdict** at the last rung: a candidate passes when the one-sided 95% upper bound of its mean paired
  difference in final validation loss is below the margin (``--max-loss-increase``).
- **Confirmation at a longer horizon** (``confirm_steps``, the CLI's default twice the race horizon): a verdict
  taken at the horizon the race tuned on says nothing about a longer run, so before a passer ships it trains
  again, same seeds, to the confirmation horizon and must be non-inferior there too (the default's runs train
  to that horizon from the start, so this costs one run per seed for each passer tried). Passers are tried
  fastest first; one that fails is recorded ("not confirmed") and the next is tried; none left, the default
  ships.
- **More seeds when the confirmation cannot tell** (``confirm_seeds``, the CLI's default twice the race's
  seeds): at 3 seeds a rounding-only change already scatters by ~0.007 nats per seed, so an unchanged-looking
  recipe is often *inconclusive* at δ = 0.01. Then the passer and the default train the extra seeds to the
  confirmation horizon and the verdict is taken again over all of them. Two looks at the same claim would
  double its error rate, so with the extension each look uses the one-sided **97.5%** bound (Bonferroni: at
  most 5% over both); a passer shown *worse* at the first look gets no more seeds.
- **Winner**: the passer with the fastest *measured* optimizer step (``timing.interleaved_step_times``:
  every final contender's ``step()`` on the real model and gradients, interleaved round by round in one
  process), if it measures at least ``min_speedup`` (1.05: the interleaved medians' typical spread on a
  shared 2-core machine is 3-6%) faster than the default's. Otherwise the default recipe ships (with stage 2's LR): an
  honest fallback beats a profile that loses.

Every run is an Optuna trial of the race study (``{study}-race-{digest}``, the digest naming the contenders,
their lrs and the options), with its evaluations in the trial's user attributes: an interrupted race resumes
where it stopped, and several workers pointed at one storage share it (a job another live process is running
is waited for, not duplicated).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from ..bench.candidates import Candidate, MomentumRank
from ..ortho import OrthoConfig
from ..ortho.spectral import model_singular_values, nonzero_mask
from ..stats import DEFAULT_CONFIDENCE, DEFAULT_MARGIN, PairedComparison, paired_comparison
from ..train import EvalPoint, train
from ..workload import Workload
from .space import BASELINE_LABEL, LayerMenu, TuneError
from .stage1 import Assignment
from .stage2 import DEFAULT_LR, LrChoice
from .study import claim, fail_stale, open_study, register_worker

TWO_LOOK_CONFIDENCE = 0.975  # each of a confirmation's two looks (Bonferroni: 1 - 2 x 0.025 = 95% over both)
UPDATE_FACTOR_RANGE = (0.1, 10.0)  # matched-update-size lr factors are clipped to this (degenerate spectra)


@dataclass(frozen=True)
class RaceOptions:
    """What defines a race (all of it goes into the race study's digest)."""

    candidates: int = 3  # K: stage-1 profiles raced against the default
    seeds: int = 3
    steps: int = 200  # the race horizon: the last rung's training steps
    rungs: int = 2  # successive-halving rungs: steps / eta^(rungs-1), ..., steps / eta, steps
    eta: int = 2
    eval_every: int | None = None  # default: the shortest rung horizon / 4
    margin: float = DEFAULT_MARGIN
    min_speedup: float = 1.05  # a passer must measure at least this much faster than the default to ship
    match_update_size: bool = True
    timing_rounds: int = 9
    adamw_lr: float = 3e-4
    confirm_steps: int = 0  # > steps: a passer must also be non-inferior after this many steps; 0: no confirmation
    confirm_seeds: int = 0  # > seeds: an inconclusive confirmation is judged again over this many; 0: no extension
    same_math: bool = True  # race the default's polynomial at each layer's fastest dtype / form too

    def check(self) -> None:
        """TuneError (one line) for options that cannot give a race."""
        if self.candidates < 0:
            raise TuneError(f"--race-candidates must be >= 0, got {self.candidates}")
        if self.seeds < 1:
            raise TuneError(f"--race-seeds must be at least 1, got {self.seeds}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise TuneError(f"--max-loss-increase must be a finite number >= 0, got {self.margin}")
        if self.rungs < 1 or self.eta < 2:
            raise TuneError(f"--race-rungs must be >= 1 and eta >= 2, got {self.rungs} and {self.eta}")
        if not (math.isfinite(self.min_speedup) and self.min_speedup >= 1):
            raise TuneError(f"--min-speedup must be a finite number >= 1, got {self.min_speedup}")
        if self.confirm_steps != 0 and self.confirm_steps <= self.steps:
            raise TuneError(
                f"--confirm-steps must be longer than --race-steps ({self.steps}) or 0 (no confirmation), got "
                f"{self.confirm_steps}"
            )
        if self.confirm_seeds != 0 and self.confirm_seeds <= self.seeds:
            raise TuneError(
                f"--confirm-seeds must be more than --race-seeds ({self.seeds}) or 0 (no extension), got "
                f"{self.confirm_seeds}"
            )
        if self.timing_rounds < 3:
            raise TuneError(f"timing rounds must be at least 3, got {self.timing_rounds}")
        every = self.eval_interval
        shortest = self.steps // self.eta ** (self.rungs - 1)
        if self.steps < 1 or every < 1 or shortest < every:
            raise TuneError(
                f"--race-steps {self.steps} is shorter than one evaluation: with {self.rungs} rung(s) the "
                f"shortest rung trains {shortest} step(s) and the race evaluates every {every}; give "
                f"--race-steps >= {every * self.eta ** (self.rungs - 1)} or fewer --race-rungs"
            )

    @property
    def eval_interval(self) -> int:
        if self.eval_every is not None:
            return self.eval_every
        return max(1, self.steps // self.eta ** (self.rungs - 1) // 4)

    @property
    def confirm_horizon(self) -> int | None:
        """The confirmation horizon, or None without one."""
        return self.confirm_steps if self.confirm_steps > self.steps else None

    @property
    def extends_seeds(self) -> bool:
        """Whether an inconclusive confirmation gets more seeds (then each of its two looks is at 97.5%)."""
        return self.confirm_horizon is not None and self.confirm_seeds > self.seeds

    @property
    def confirm_confidence(self) -> float:
        """The one-sided confidence of each confirmation look: 95% for one look, 97.5% for each of two."""
        return TWO_LOOK_CONFIDENCE if self.extends_seeds else DEFAULT_CONFIDENCE

    @property
    def reference_horizon(self) -> int:
        """How long the default trains per seed: to the confirmation horizon when there is one, read at every
        rung on the way (a constant-lr run passes through the shorter runs' states exactly)."""
        return self.confirm_horizon or self.steps

    def horizons(self) -> list[int]:
        """Rung horizons, shortest first, each a multiple of the eval interval (so every rung is evaluated)."""
        every = self.eval_interval
        out = []
        for i in range(self.rungs):
            h = self.steps // self.eta ** (self.rungs - 1 - i)
            out.append(max(every, h // every * every) if i < self.rungs - 1 else self.steps)
        return sorted(set(out))

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "seeds": self.seeds,
            "steps": self.steps,
            "rungs": self.rungs,
            "eta": self.eta,
            "eval_every": self.eval_interval,
            "margin": self.margin,
            "min_speedup": self.min_speedup,
            "match_update_size": self.match_update_size,
            "timing_rounds": self.timing_rounds,
            "horizons": self.horizons(),
            "same_math": self.same_math,
            "confirm_steps": self.confirm_horizon,
            "confirm_seeds": self.confirm_seeds if self.extends_seeds else None,
            "confirm_confidence": self.confirm_confidence if self.confirm_horizon else None,
        }


@dataclass(frozen=True)
class Contender:
    """One profile in the race: stage-1 picks with the shared LR treatment, as a trainable profile."""

    name: str  # "default", "c1", ...
    assignment: Assignment
    profile: dict[str, Any]
    update_factors: dict[str, float]

    @property
    def key(self) -> str:
        text = json.dumps(self.profile["layers"], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def is_default(self) -> bool:
        return self.name == "default"


@dataclass
class JobResult:
    """One (contender, seed, horizon) training run, as stored in its trial."""

    evals: list[EvalPoint]
    diverged_at: int | None
    median_optimizer_step_s: float | None
    median_step_s: float | None
    total_wall_s: float

    def val_at(self, step: int) -> float | None:
        for point in self.evals:
            if point.step == step:
                return point.val_loss
        return None

    def to_attrs(self) -> dict[str, Any]:
        return {
            "evals": [[p.step, p.wall_s, p.val_loss] for p in self.evals],
            "diverged_at": self.diverged_at,
            "median_optimizer_step_s": self.median_optimizer_step_s,
            "median_step_s": self.median_step_s,
            "total_wall_s": self.total_wall_s,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> JobResult:
        evals = [EvalPoint(int(s), float(w), None if v is None else float(v)) for s, w, v in attrs["evals"]]
        return cls(
            evals,
            attrs.get("diverged_at"),
            attrs.get("median_optimizer_step_s"),
            attrs.get("median_step_s"),
            float(attrs.get("total_wall_s", 0.0)),
        )


@dataclass
class RaceRow:
    """A contender's line in the race table (what the profile records)."""

    name: str
    key: str
    predicted_time_ms: float
    predicted_speedup: float
    descent_share: float
    methods: dict[str, int]
    horizon: int | None = None  # the last horizon it ran (where it was judged or eliminated)
    comparison: PairedComparison | None = None
    eliminated_at: int | None = None
    diverged: bool = False
    measured_step_ms: float | None = None
    measured_speedup: float | None = None
    steps_to_target: list[int | None] = field(default_factory=list)
    confirm_horizon: int | None = None  # set when this passer was trained again to the confirmation horizon
    confirmation: PairedComparison | None = None  # its verdict there (None: not tried, or it diverged)
    confirm_diverged: bool = False
    confirm_steps_to_target: list[int | None] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        return self.confirmation is not None and self.confirmation.passes and not self.confirm_diverged

    @property
    def verdict(self) -> str:
        if self.name == "default":
            return "reference"
        if self.diverged:
            return "diverged"
        if self.comparison is None:
            return "not run"
        if self.eliminated_at is not None:
            return f"eliminated ({self.comparison.verdict})"
        if self.confirm_horizon is not None and not self.confirmed:
            later = "diverged" if self.confirm_diverged or self.confirmation is None else self.confirmation.verdict
            return f"not confirmed at {self.confirm_horizon} ({later})"
        return self.comparison.verdict

    @property
    def passes(self) -> bool:
        return self.comparison is not None and self.comparison.passes and self.eliminated_at is None

    def to_json(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "name": self.name,
            "key": self.key,
            "methods": self.methods,
            "predicted_ortho_ms": self.predicted_time_ms,
            "predicted_speedup": self.predicted_speedup,
            "descent_share": self.descent_share,
            "horizon": self.horizon,
            "paired_delta": None if c is None else c.mean_diff,
            "bound": None if c is None else c.upper_bound,
            "diffs": None if c is None else list(c.diffs),
            "verdict": self.verdict,
            "eliminated_at": self.eliminated_at,
            "measured_step_ms": self.measured_step_ms,
            "measured_speedup": self.measured_speedup,
            "steps_to_target": self.steps_to_target,
            "confirm_horizon": self.confirm_horizon,
            "confirm_delta": None if self.confirmation is None else self.confirmation.mean_diff,
            "confirm_bound": None if self.confirmation is None else self.confirmation.upper_bound,
            "confirm_diffs": None if self.confirmation is None else list(self.confirmation.diffs),
            "confirm_verdict": None if self.confirmation is None else self.confirmation.verdict,
            "confirm_seeds": None if self.confirmation is None else self.confirmation.n,
            "confirm_confidence": None if self.confirmation is None else self.confirmation.confidence,
            "confirm_steps_to_target": self.confirm_steps_to_target,
        }


@dataclass
class RaceResult:
    options: RaceOptions
    rows: list[RaceRow]
    winner: str  # a contender name; "default" when none passed (the fallback)
    study_name: str
    seeds: list[int]
    timing: dict[str, Any]
    runs_done_now: int
    reason: str  # one line: why the winner won (or why the default ships)

    @property
    def fell_back(self) -> bool:
        return self.winner == "default"

    def row(self, name: str) -> RaceRow:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "options": self.options.to_json(),
            "seeds": self.seeds,
            "study": self.study_name,
            "winner": self.winner,
            "fallback": self.fell_back,
            "runs_done_now": self.runs_done_now,
            "reason": self.reason,
            "timing": self.timing,
            "table": [r.to_json() for r in self.rows],
            "rule": (
                "paired seeds (same init, same batches); per-seed difference of final validation loss at the "
                "horizon, candidate - default; passes when the one-sided 95% upper bound of the mean difference "
                "is below the margin; with a confirmation horizon a passer must pass again there (same seeds, "
                "trained from scratch); the winner is the first passer, fastest measured optimizer step first "
                "(interleaved timing), that does, else the default"
            ),
        }


# ------------------------------------------------------------------------------------------- contenders


def update_norm(s: torch.Tensor, config: Candidate, shape: tuple[int, int]) -> float:
    """Predicted ``||O||_F`` of ``config``'s update on an ``shape`` matrix with singular values ``s``.

    Newton-Schulz, SVD and the low-rank methods (with or without error feedback: the step is the same) come
    from the spectral model. A low-rank momentum's step is the exact polar factor of rank r: ``sqrt(r)``. A
    subset step orthogonalizes ``k = ceil(f * long side)`` rows (or columns); it is modelled as the same core
    on the top ``min(k, short side)`` singular directions (the selected rows carry at most that rank).
    """
    if isinstance(config, MomentumRank):
        rank = int(nonzero_mask(torch.as_tensor(s, dtype=torch.float64)).sum())
        return math.sqrt(min(config.rank, rank))
    assert isinstance(config, OrthoConfig)
    if config.method == "subset":
        from ..ortho.feedback import subset_size

        rank = min(subset_size(shape, float(config.fraction or 1.0)), min(shape))
        config = OrthoConfig(method="lowrank", rank=rank, ns_steps=config.ns_steps, coefficients=config.coefficients,
                             dtype=config.dtype, eps=config.eps)  # fmt: skip
    return float(torch.linalg.vector_norm(model_singular_values(s, config)))


def update_size_factors(
    menus: Sequence[LayerMenu], picks: Mapping[str, str], spectra: Mapping[str, torch.Tensor] | None
) -> dict[str, float]:
    """Per layer: the lr factor that makes the candidate's predicted ``||O||_F`` equal the default recipe's on
    the layer's momentum spectrum (1 for layers on the default recipe, or without a spectrum)."""
    out: dict[str, float] = {}
    lo, hi = UPDATE_FACTOR_RANGE
    for menu in menus:
        label = picks[menu.name]
        s = None if spectra is None else spectra.get(menu.name)
        if label == BASELINE_LABEL or s is None or BASELINE_LABEL not in menu.labels:
            out[menu.name] = 1.0
            continue
        base = update_norm(s, menu.option(BASELINE_LABEL).config, menu.shape)
        mine = update_norm(s, menu.option(label).config, menu.shape)
        out[menu.name] = 1.0 if mine <= 0 or base <= 0 else min(hi, max(lo, base / mine))
    return out


def contender_profile(
    menus: Sequence[LayerMenu], picks: Mapping[str, str], lr: LrChoice, factors: Mapping[str, float]
) -> dict[str, Any]:
    """The in-memory profile a contender trains with: its recipes, stage 2's scales times the update factors."""
    from .writer import settings_of

    configs = {m.name: m.option(picks[m.name]).config for m in menus}
    scales = lr.scales(menus, configs)
    defaults: dict[str, Any] = {"lr_rule": lr.lr_rule}
    if lr.adamw_mult != 1.0:
        defaults["lr_scale"] = lr.adamw_mult
    return {
        "format": "muonprof.profile/1",
        "defaults": defaults,
        "layers": {
            m.name: {**settings_of(configs[m.name]), "lr_scale": scales[m.name] * factors.get(m.name, 1.0)}
            for m in menus
        },
    }


def pick_candidates(front: Sequence[Assignment], baseline: Assignment, choice: Assignment, k: int) -> list[Assignment]:
    """Up to ``k`` front profiles predicted faster than the default, spread evenly in log-speedup from the
    mildest to stage 1's own pick ``choice`` (always included when it is faster; when it is the mildest, the
    spread runs to the most aggressive). Why not to the front's far end: the most aggressive profiles are the
    ones the one-step model flatters most (they drop the spectral tail), so racing them spends the race on
    near-certain losers while the middle of the front, where a winner is likeliest, goes untried."""
    faster = sorted({id(a): a for a in front if a.time_s < baseline.time_s}.values(), key=lambda a: -a.time_s)
    distinct: list[Assignment] = []
    for a in faster:
        if a.picks != baseline.picks and all(a.picks != b.picks for b in distinct):
            distinct.append(a)
    if k <= 0 or not distinct:
        return []

    def log_speedup(a: Assignment) -> float:
        return math.log(baseline.time_s / a.time_s)

    pick = next((a for a in distinct if a.picks == choice.picks), None)
    chosen: list[Assignment] = [pick] if pick is not None else []
    top = log_speedup(pick) if pick is not None and pick is not distinct[0] else log_speedup(distinct[-1])
    pool = [a for a in distinct if log_speedup(a) <= top + 1e-12]
    targets = [log_speedup(pool[0]) + (top - log_speedup(pool[0])) * i / max(1, k - 1) for i in range(k)]
    for t in targets:  # the profile nearest each target (the pick may already be one of them)
        nearest = min(pool, key=lambda a: abs(log_speedup(a) - t))
        if len(chosen) < k and all(nearest.picks != b.picks for b in chosen):
            chosen.append(nearest)
    for a in pool:  # targets that fell on the same profile: fill up with the next untried ones
        if len(chosen) >= k:
            break
        if all(a.picks != b.picks for b in chosen):
            chosen.append(a)
    return sorted(chosen, key=lambda a: -a.time_s)


def build_contenders(
    menus: Sequence[LayerMenu],
    baseline: Assignment,
    candidates: Sequence[Assignment],
    lr: LrChoice,
    spectra: Mapping[str, torch.Tensor] | None,
    match_update_size: bool = True,
    same_math: Assignment | None = None,
) -> list[Contender]:
    """The default, then ``same-math`` (when given), then ``c1``... for ``candidates``."""
    out = [Contender("default", baseline, contender_profile(menus, baseline.picks, lr, {}), {})]
    named = [("same-math", same_math)] if same_math is not None else []
    for name, a in [*named, *((f"c{i}", a) for i, a in enumerate(candidates, 1))]:
        factors = update_size_factors(menus, a.picks, spectra) if match_update_size else {}
        out.append(Contender(name, a, contender_profile(menus, a.picks, lr, factors), factors))
    return out


def methods_of(menus: Sequence[LayerMenu], picks: Mapping[str, str]) -> dict[str, int]:
    """How many layers use each recipe (by bench label), for the table."""
    counts: dict[str, int] = {}
    for menu in menus:
        counts[picks[menu.name]] = counts.get(picks[menu.name], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------- the race

BuildWorkload = Callable[[int], Workload]  # seed -> a fresh workload (that seed's init and batches)
TrainContender = Callable[["Contender", int, int], "JobResult"]  # (contender, seed, horizon) -> its run


@dataclass
class RaceEvent:
    """What ``progress`` hears: ``plan`` (total runs), ``start``/``done`` of a run, ``rung`` results, ``timing``."""

    kind: str
    contender: str = ""
    seed: int = 0
    horizon: int = 0
    done: int = 0
    total: int = 0
    message: str = ""


def run_race(
    build: BuildWorkload,
    contenders: Sequence[Contender],
    *,
    options: RaceOptions,
    menus: Sequence[LayerMenu],
    storage: str,
    study_name: str,
    fingerprint: str,
    model: str,
    seed: int = 0,
    progress: Callable[[RaceEvent], None] | None = None,
    time_steps: Callable[..., dict[str, Any]] | None = None,
    train_fn: TrainContender | None = None,
) -> RaceResult:
    """Run (or resume) the race and pick the winner; see the module docstring. ``train_fn`` (one run) and
    ``time_steps`` (the interleaved timing) replace real training and timing in tests."""
    options.check()
    seeds = list(range(seed, seed + options.seeds))
    horizons = options.horizons()
    every = options.eval_interval
    digest = race_digest(contenders, options, seeds)
    name = f"{study_name}-race-{digest}"
    study = open_study(
        storage, name, fingerprint=fingerprint, model=model, stage=f"race:{digest}", direction="minimize"
    )
    notify = progress or (lambda event: None)
    default, candidates = contenders[0], list(contenders[1:])
    base_time = default.assignment.time_s
    rows = {
        c.name: RaceRow(
            c.name,
            c.key,
            c.assignment.time_s * 1e3,
            base_time / c.assignment.time_s if c.assignment.time_s else 1.0,
            c.assignment.quality,
            methods_of(menus, c.assignment.picks),
        )
        for c in contenders
    }
    # Every run is evaluated where it is judged: the default's run (to the confirmation horizon) passes through the
    # race horizon, which need not be a multiple of the evaluation interval.
    judged_at = (*horizons, *((options.confirm_horizon,) if options.confirm_horizon else ()))
    if train_fn is None:

        def train_fn(contender: Contender, seed: int, horizon: int) -> JobResult:
            return train_contender(build, contender, seed, horizon, eval_every=every, adamw_lr=options.adamw_lr,
                                   eval_at=judged_at)  # fmt: skip

    jobs = _Jobs(study, train_fn, notify)
    planned = _planned_runs(len(candidates), seeds, horizons, options.eta)
    notify(RaceEvent("plan", total=planned + (len(seeds) if options.confirm_horizon and candidates else 0)))

    reference = {s: jobs.result(default, s, options.reference_horizon) for s in seeds}
    rows["default"].horizon = options.reference_horizon
    alive = list(candidates)
    if any(r.diverged_at is not None for r in reference.values()):
        raise TuneError(
            "the default recipe diverged in the race with stage 2's learning rates: lower --lr-trials' range or "
            "give --lr-trials 0"
        )
    for rung, horizon in enumerate(horizons):
        last = rung == len(horizons) - 1
        ref = [reference[s].val_at(horizon) for s in seeds]
        judged: list[tuple[Contender, PairedComparison]] = []
        for c in alive:
            results = [jobs.result(c, s, horizon) for s in seeds]
            row = rows[c.name]
            row.horizon = horizon
            if any(r.diverged_at is not None for r in results):
                row.diverged = True
                row.eliminated_at = horizon
                continue
            vals = [r.val_at(horizon) for r in results]
            if any(v is None for v in vals) or any(v is None for v in ref):
                raise TuneError("the workload has no validation batches: the race needs validation loss")
            comparison = paired_comparison(vals, ref, options.margin)  # type: ignore[arg-type]
            row.comparison = comparison
            row.steps_to_target = _steps_to_target(results, [reference[s] for s in seeds], horizon)
            judged.append((c, comparison))
        if last:
            break
        keep = [(c, cmp) for c, cmp in judged if cmp.verdict != "worse"]
        keep.sort(key=lambda cc: _rank_key(cc[1]))
        survivors = [c for c, _ in keep[: max(1, math.ceil(len(judged) / options.eta))]]
        for c, _ in judged:
            if c not in survivors:
                rows[c.name].eliminated_at = horizon
        notify(RaceEvent("rung", horizon=horizon, message=", ".join(c.name for c in survivors) or "none"))
        alive = survivors

    finalists = [c for c in alive if rows[c.name].passes]
    timed = [default, *(c for c in alive if not rows[c.name].diverged)]
    notify(RaceEvent("timing", message=", ".join(c.name for c in timed)))
    # Measured once per race and stored with it: a resumed race, or a second worker, takes the same decision.
    timing = study.user_attrs.get("timing")
    if timing is None or set(timing.get("median_ms", {})) != {c.name for c in timed}:
        timer = time_steps or _default_timer
        timing = timer(build(seed), {c.name: c.profile for c in timed}, rounds=options.timing_rounds,
                       adamw_lr=options.adamw_lr)  # fmt: skip
        study.set_user_attr("timing", timing)
    base_ms = timing["median_ms"]["default"]
    for c in timed:
        row = rows[c.name]
        row.measured_step_ms = timing["median_ms"][c.name]
        row.measured_speedup = base_ms / row.measured_step_ms if row.measured_step_ms else None
    shippable, reason = _shippable(rows, finalists, options, horizons[-1])
    winner = "default"
    confirm = options.confirm_horizon
    for c in shippable:  # fastest first
        row = rows[c.name]
        if confirm is None:
            winner, reason = c.name, _win_reason(row, horizons[-1])
            break
        level = options.confirm_confidence
        results = [jobs.result(c, s, confirm) for s in seeds]
        _confirm(row, c, results, [reference[s] for s in seeds], confirm, options.margin, level)
        if options.extends_seeds and row.confirmation is not None and row.confirmation.verdict == "inconclusive":
            more = list(range(seeds[-1] + 1, seed + options.confirm_seeds))
            notify(RaceEvent("extend", c.name, message=f"{len(more)} more seeds"))
            reference.update({s: jobs.result(default, s, confirm) for s in more})
            results += [jobs.result(c, s, confirm) for s in more]
            _confirm(row, c, results, [reference[s] for s in [*seeds, *more]], confirm, options.margin, level)
        if row.confirmed:
            winner, reason = c.name, _win_reason(row, horizons[-1])
            break
    else:
        if shippable and confirm is not None:
            tried = "; ".join(_unconfirmed(rows[c.name]) for c in shippable)
            reason = (
                f"passed at {horizons[-1]} steps but not confirmed at {confirm} ({tried}): the default recipe ships"
            )
    notify(RaceEvent("finished", done=jobs.done, total=jobs.done))
    return RaceResult(options, list(rows.values()), winner, name, seeds, timing, jobs.ran, reason)


def _shippable(
    rows: Mapping[str, RaceRow], finalists: Sequence[Contender], options: RaceOptions, horizon: int
) -> tuple[list[Contender], str]:
    """The passers that may ship, fastest measured step first, and why the default ships when there are none."""
    n = options.seeds
    if n < 2:
        return [], "one race seed gives no verdict: the default recipe ships (use --race-seeds 3)"
    if not finalists:
        return [], (
            f"no candidate was non-inferior to the default at {horizon} steps (margin {options.margin:g} nats, "
            f"{n} paired seeds): the default recipe ships"
        )
    faster = [c for c in finalists if (rows[c.name].measured_speedup or 0) >= options.min_speedup]
    if not faster:
        names = ", ".join(f"{c.name} ({rows[c.name].measured_speedup or 0:.2f}x)" for c in finalists)
        return [], (
            f"{names} passed but measured less than {options.min_speedup:g}x faster than the default "
            "(--min-speedup): the default recipe ships"
        )
    return sorted(faster, key=lambda c: -(rows[c.name].measured_speedup or 0)), ""


def _confirm(
    row: RaceRow,
    contender: Contender,
    results: Sequence[JobResult],
    reference: Sequence[JobResult],
    horizon: int,
    margin: float,
    confidence: float,
) -> None:
    """Record a passer's verdict after ``horizon`` steps (the race's paired rule, at ``confidence``)."""
    row.confirm_horizon = horizon
    if any(r.diverged_at is not None for r in reference):
        raise TuneError(
            f"the default recipe diverged within {horizon} steps with stage 2's learning rates: lower --lr-trials' "
            "range, give --lr-trials 0, or a shorter --confirm-steps"
        )
    if any(r.diverged_at is not None for r in results):
        row.confirm_diverged = True
        return
    vals = [r.val_at(horizon) for r in results]
    ref = [r.val_at(horizon) for r in reference]
    if any(v is None for v in vals) or any(v is None for v in ref):
        raise TuneError("the workload has no validation batches: the race needs validation loss")
    row.confirmation = paired_comparison(vals, ref, margin, confidence)  # type: ignore[arg-type]
    row.confirm_steps_to_target = _steps_to_target(results, reference, horizon)


def _unconfirmed(row: RaceRow) -> str:
    if row.confirm_diverged or row.confirmation is None:
        return f"{row.name} diverged"
    return f"{row.name}: {row.confirmation.describe()}"


def _win_reason(row: RaceRow, horizon: int) -> str:
    assert row.comparison is not None
    said = f"{row.name} is {row.comparison.verdict} at {horizon} steps ({row.comparison.describe()})"
    if row.confirmation is not None:
        confidence = row.confirmation.confidence
        level = "" if confidence == DEFAULT_CONFIDENCE else f", {confidence:.1%} bound"
        said += f", {row.confirmation.verdict} at {row.confirm_horizon} ({row.confirmation.describe()}{level}),"
    return f"{said} and its optimizer step measured {row.measured_speedup:.2f}x faster"


def _rank_key(c: PairedComparison) -> tuple[float, float]:
    return (c.upper_bound if c.upper_bound is not None else c.mean_diff, c.mean_diff)


def _steps_to_target(results: Sequence[JobResult], reference: Sequence[JobResult], horizon: int) -> list[int | None]:
    """Per seed: the first evaluation step at which the candidate reaches the default's loss at ``horizon``."""
    out: list[int | None] = []
    for mine, ref in zip(results, reference):
        target = ref.val_at(horizon)
        hit = next(
            (p.step for p in mine.evals if target is not None and p.val_loss is not None and p.val_loss <= target), None
        )
        out.append(hit)
    return out


def _planned_runs(candidates: int, seeds: Sequence[int], horizons: Sequence[int], eta: int) -> int:
    total, alive = len(seeds), candidates
    for _ in horizons:
        total += alive * len(seeds)
        alive = max(1, math.ceil(alive / eta)) if alive else 0
    return total


def race_digest(contenders: Sequence[Contender], options: RaceOptions, seeds: Sequence[int]) -> str:
    text = json.dumps(
        {"contenders": [[c.name, c.key] for c in contenders], "options": options.to_json(), "seeds": list(seeds)},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class _Jobs:
    """Runs stored as trials: reuse a finished one, wait for one a live worker is running, else run it."""

    def __init__(self, study: optuna.Study, train: TrainContender, notify: Callable[[RaceEvent], None]) -> None:
        self.study, self.train, self.notify = study, train, notify
        register_worker(study)  # before any ask(): a run killed before its claim() is then seen as dead at once
        self.ran = 0
        self.done = 0

    def result(self, contender: Contender, seed: int, horizon: int) -> JobResult:
        job = f"{contender.key}:{seed}:{horizon}"
        while True:
            found = self._find(job)
            if found is not None:
                self.done += 1
                self.notify(RaceEvent("done", contender.name, seed, horizon, done=self.done, message="stored"))
                return found
            if not self._running_elsewhere(job):
                break
            time.sleep(2.0)
        return self._run(contender, seed, horizon, job)

    def _find(self, job: str) -> JobResult | None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("job") == job:
                return JobResult.from_attrs(t.user_attrs)
        return None

    def _running_elsewhere(self, job: str) -> bool:
        """A RUNNING trial for this job by another live process (on this host: its pid is alive)."""
        fail_stale(self.study)  # runs whose process is gone are done again
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return any(t.user_attrs.get("job") == job for t in running)

    def _run(self, contender: Contender, seed: int, horizon: int, job: str) -> JobResult:
        trial = self.study.ask()
        claim(trial)
        attrs = {"job": job, "contender": contender.name, "seed": seed, "horizon": horizon}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.notify(RaceEvent("start", contender.name, seed, horizon, done=self.done))
        try:
            result = self.train(contender, seed, horizon)
            for key, value in result.to_attrs().items():
                trial.set_user_attr(key, value)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        final = result.val_at(horizon)
        self.study.tell(trial, final if final is not None and math.isfinite(final) else float("inf"))
        self.ran += 1
        self.done += 1
        self.notify(RaceEvent("done", contender.name, seed, horizon, done=self.done))
        return result


def train_contender(
    build: BuildWorkload,
    contender: Contender,
    seed: int,
    horizon: int,
    *,
    eval_every: int,
    adamw_lr: float,
    eval_at: Sequence[int] = (),
) -> JobResult:
    """One race run: a fresh workload from ``seed`` (its init and batches), ProfiledMuon with the contender's
    profile, ``horizon`` steps evaluated every ``eval_every`` (and at the end)."""
    from ..optim import ProfiledMuon

    workload = build(seed)
    optimizer = ProfiledMuon(workload.model, contender.profile, lr=DEFAULT_LR, adamw_lr=adamw_lr, seed=seed)
    run = train(workload, optimizer, steps=horizon, eval_every=eval_every, eval_at=eval_at)
    return JobResult(run.evals, run.diverged_at, run.median_optimizer_step_s, run.median_step_s, run.total_wall_s)


def _default_timer(workload: Workload, profiles: Mapping[str, Any], *, rounds: int, adamw_lr: float) -> dict[str, Any]:
    from .timing import interleaved_step_times

    return interleaved_step_times(workload, profiles, rounds=rounds, adamw_lr=adamw_lr)
