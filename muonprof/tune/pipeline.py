"""The whole ``muonprof tune`` flow as one library call: capture -> bench -> stage 1 -> stage 2 -> race -> profile.

``muonprof tune`` parses options into a ``TuneRequest`` and prints; everything it decides happens here, so a
script (or a test) runs the same pipeline with ``run_tune(request)``. Each stage takes its inputs explicitly
and leaves an artifact:

1. **capture** (``NAME.spectra.pt`` beside the profile): real training steps and the gradient/momentum spectra;
2. **bench** (``NAME.bench.json``): cost and accuracy of every candidate on this device;
3. **stage 1** (Optuna study ``{study}-ortho``): per-layer menus -> the Pareto front of whole-model profiles;
4. **stage 2** (``{study}-lr``): learning-rate scaling from short real runs *of the default recipe*, applied to
   every contender of the race (see ``race``: the same LR treatment for all);
5. **stage 3** (``{study}-race-{digest}``): the race in real training; its winner, or the default, ships.

Spectra and bench files are reused when they were made for the same inputs (their ``tune_inputs`` digest
matches): a re-run after an interruption goes straight back to the stage it stopped in, and every Optuna
stage resumes from its stored trials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .._files import safe_name
from ..bench import load_bench, parse_grid, run_bench, save_bench
from ..capture import (
    DEFAULT_WARMUP_STEPS,
    DEFAULT_WINDOW,
    Spectra,
    capture_spectra,
    check_window,
    load_spectra,
    save_spectra,
)
from ..models.registry import BUILTINS
from ..profile import Profile, save_profile
from ..profile import fingerprint as fingerprint_of
from ..workload import Workload, build_workload
from .race import (
    Contender,
    RaceEvent,
    RaceOptions,
    RaceResult,
    build_contenders,
    pick_candidates,
    run_race,
    update_size_factors,
)
from .run import Stage1Result, Stage2Result, check_bench_matches, default_study_name, tune_stage1, tune_stage2
from .space import LayerMenu, Option, TuneError
from .stage1 import Assignment, same_math
from .stage2 import LrChoice
from .study import default_storage, finished_trials
from .writer import build_profile, layer_ladder, state_summary

Update = Callable[..., None]  # update(completed, total=None)
_VOLATILE_META = frozenset({"created", "timings", "command", "versions"})  # a spectra file's, not its inputs


class Reporter(Protocol):
    """How the pipeline tells a person what it is doing (the CLI prints; a script may stay silent)."""

    def stage(self, text: str) -> None: ...

    def track(self, label: str, total: int) -> contextlib.AbstractContextManager[Update]: ...


class Silent:
    """A Reporter that says nothing."""

    def stage(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def track(self, label: str, total: int) -> Iterator[Update]:
        yield lambda *args, **kwargs: None


@dataclass
class TuneRequest:
    """Everything ``muonprof tune`` was asked (the CLI's options, checked)."""

    source: str  # MODEL spec or a spectra file
    out: Path | None = None
    bench_file: Path | None = None
    target_alignment: float | None = None
    time_budget_s: float | None = None
    state_budget: int | None = None
    trials: int = 300
    lr_trials: int = 12
    lr_steps: int = 60
    eval_every: int | None = None
    pruner: str = "median"
    floor: float = 0.5
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    capture_steps: int = 20
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    captures: int = 3
    window: int = DEFAULT_WINDOW
    batch_size: int = 8
    seq_len: int | None = None
    data: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    overrides: dict[str, Any] = field(default_factory=dict)
    methods: str | None = None  # bench's grid, as bench's flags spell it (None: bench's default for the axis)
    ranks: str | None = None
    ns_steps: str | None = None
    schedules: str | None = None
    dtypes: str | None = None
    bench_seeds: int = 3
    race: RaceOptions = field(default_factory=RaceOptions)
    ladders: bool = False  # write adaptive ladders around the shipped recipes (see _ladders)
    command: str = "muonprof tune"

    def check(self) -> None:
        """TuneError (one line) for options that cannot give a profile; nothing has been written yet."""
        if self.trials < 1:
            raise TuneError(f"--trials must be at least 1, got {self.trials}")
        if self.lr_trials < 0 or self.lr_steps < 1:
            raise TuneError("--lr-trials must be >= 0 and --lr-steps >= 1")
        if self.target_alignment is not None and self.time_budget_s is not None:
            raise TuneError("give --target-alignment or --time-budget-ms, not both")
        if self.target_alignment is not None and not 0 < self.target_alignment <= 1:
            raise TuneError(f"--target-alignment must be in (0, 1], got {self.target_alignment}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise TuneError(f"--time-budget-ms must be positive, got {self.time_budget_s * 1e3}")
        if self.pruner not in ("median", "hyperband"):
            raise TuneError(f"--pruner must be median or hyperband, got {self.pruner!r}")
        if self.capture_steps < 1:
            raise TuneError(f"--capture-steps must be at least 1, got {self.capture_steps}")
        if self.warmup_steps < 0:
            raise TuneError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 1 <= self.captures <= self.capture_steps:
            raise TuneError(f"--captures must be in [1, --capture-steps {self.capture_steps}], got {self.captures}")
        try:
            check_window(self.window, self.capture_steps)
        except ValueError as err:
            raise TuneError(str(err).replace("--steps", "--capture-steps")) from None
        self.race.check()


@dataclass
class TuneOutcome:
    """What the pipeline produced, for the CLI to print."""

    profile: Profile
    out: Path
    model: str
    storage: str
    study: str
    stage1: Stage1Result
    stage2: Stage2Result | None
    race: RaceResult | None
    shipped: str  # "default" | a race contender name | "stage 1 (unraced)"
    assignment: Any  # stage1.Assignment of the shipped recipes
    lr: LrChoice
    state: dict[str, Any]
    artifacts: dict[str, str]
    notes: list[str]


def run_tune(request: TuneRequest, reporter: Reporter | None = None) -> TuneOutcome:
    """Run (or resume) the pipeline and write the profile. Raises TuneError and the loaders' one-line errors."""
    ui = reporter or Silent()
    request.check()
    spectra, model, inputs = _source(request)
    out = request.out if request.out is not None else Path(f"{safe_name(model)}.profile.json")
    storage = request.storage or default_storage(out)

    def build(seed: int = request.seed) -> Workload:
        return build_workload(
            model,
            overrides=inputs["overrides"],
            data=inputs["data"],
            batch_size=request.batch_size,
            seq_len=inputs["seq_len"],
            seed=seed,
            device=request.device,
        )

    workload = build()
    shapes = {n: tuple(p.shape) for n, p in workload.model.named_parameters() if p.requires_grad}
    fingerprint = fingerprint_of(shapes.items())
    if spectra is not None and spectra.meta.get("fingerprint") not in (None, fingerprint):
        raise TuneError(f"{request.source}: the spectra were captured on another model ({spectra.meta['fingerprint']})")
    name = request.study_name or default_study_name(model, fingerprint)
    bench = load_bench(request.bench_file) if request.bench_file is not None else None
    grid_flags = {
        "methods": request.methods,
        "ranks": request.ranks,
        "steps": request.ns_steps,
        "schedules": request.schedules,
        "dtypes": request.dtypes,
    }
    grid = parse_grid(**grid_flags) if any(v is not None for v in grid_flags.values()) else None
    artifacts: dict[str, str] = {}
    notes: list[str] = []

    search_inputs = _search_inputs(request, spectra, inputs)
    capture_key = _digest({"model": model, "fingerprint": fingerprint, **search_inputs})
    spectra_path = out.with_name(out.stem + ".spectra.pt")
    bench_path = out.with_name(out.stem + ".bench.json")
    if spectra is None and bench is None:
        spectra = _reusable(spectra_path, capture_key, load_spectra)
        if spectra is not None:
            ui.stage(f"1/5 capture: reusing {spectra_path} (made for the same inputs)")
        else:
            ui.stage(
                f"1/5 capture: {request.warmup_steps} burn-in + {request.capture_steps} training steps of {model}, "
                f"{request.captures} snapshots, a {request.window}-step gradient window"
            )
            with ui.track("capture", request.warmup_steps + request.capture_steps) as update:
                spectra = capture_spectra(
                    workload,
                    steps=request.capture_steps,
                    every=max(1, request.capture_steps),
                    warmup_steps=request.warmup_steps,
                    captures=request.captures,
                    window=request.window,
                    seed=request.seed,
                    on_step=lambda step, loss: update(step),
                    command=request.command,
                )
            spectra.meta["tune_inputs"] = capture_key
            save_spectra(spectra, spectra_path)
        artifacts["spectra"] = str(spectra_path)
    if bench is None:
        assert spectra is not None
        bench_key = _digest(
            {
                "spectra": spectra.meta.get("tune_inputs") or capture_key,
                **({k: v for k, v in grid_flags.items() if v is not None} or {"methods": None, "ranks": None}),
                "seeds": request.bench_seeds,
                "device": str(request.device),
            }
        )
        bench = _reusable(bench_path, bench_key, load_bench)
        if bench is not None:
            ui.stage(f"2/5 bench: reusing {bench_path} (made for the same spectra and grid)")
        else:
            ui.stage(f"2/5 bench: orthogonalizer cost and accuracy on {request.device}")
            with ui.track("bench", 1) as update:
                bench = run_bench(
                    spectra,
                    device=request.device,
                    grid=grid,
                    seeds=request.bench_seeds,
                    command=request.command,
                    progress=lambda phase, detail, done, total: update(done, total=max(total, 1)),
                )
            bench.meta["tune_inputs"] = bench_key
            save_bench(bench, bench_path)
        artifacts["bench"] = str(bench_path)
    check_bench_matches(bench, spectra, fingerprint)

    ui.stage(f"3/5 orthogonalizers: Optuna studies in {storage}")
    with ui.track("stage 1 trials", request.trials) as update:
        s1 = tune_stage1(
            bench,
            spectra,
            storage=storage,
            study_name=name,
            fingerprint=fingerprint,
            model=model,
            trials=request.trials,
            seed=request.seed,
            target_alignment=request.target_alignment,
            time_budget_s=request.time_budget_s,
            floor=request.floor,
            state_budget=request.state_budget,
            on_trial=lambda study, trial: update(min(len(finished_trials(study, searched_only=True)), request.trials)),
            key=search_inputs,
        )
        update(request.trials)
    notes.extend(s1.notes)
    if s1.adopted_bench and s1.bench is not None:
        ui.stage(f"3/5 orthogonalizers: using the bench study {s1.study_name} was made with (these timings differ)")
        bench = s1.bench  # its costs go into the profile: every worker writes the same one
        if "bench" in artifacts:  # and the file beside it, so that the next run starts from the same
            save_bench(bench, bench_path)

    s2 = None
    lr = LrChoice()
    if request.lr_trials > 0:
        every = request.eval_every or max(1, request.lr_steps // 4)
        ui.stage(
            f"4/5 learning rates of the default recipe: {request.lr_trials} trials x {request.lr_steps} steps, "
            f"study {name}-lr"
        )
        base_configs = {m.name: m.option(s1.baseline.picks[m.name]).config for m in s1.menus}
        with ui.track("stage 2 trials", request.lr_trials) as update:
            s2 = tune_stage2(
                build,
                s1.menus,
                base_configs,
                storage=storage,
                study_name=name,
                fingerprint=fingerprint,
                model=model,
                trials=request.lr_trials,
                steps=request.lr_steps,
                eval_every=every,
                seed=request.seed,
                pruner=request.pruner,
                on_trial=lambda study, trial: update(min(len(finished_trials(study)), request.lr_trials)),
                key=_data_inputs(request, inputs),  # stage 2 trains from scratch: the capture plays no part
            )
            update(request.lr_trials)  # trials stored by an earlier run or another worker count too
        lr = s2.choice

    race: RaceResult | None = None
    candidates = pick_candidates(s1.front, s1.baseline, s1.choice, request.race.candidates)
    same = _same_math(request, s1, candidates)
    momentum = {n: t for n, t in spectra.captures[-1].momentum.items()} if spectra is not None else None
    contenders = build_contenders(s1.menus, s1.baseline, candidates, lr, momentum, request.race.match_update_size,
                                  same_math=same)  # fmt: skip
    if request.race.candidates > 0 and (candidates or same is not None):
        race = _race(request, ui, build, contenders, s1, storage, name, fingerprint, model)
        shipped = race.winner
        notes.append(race.reason)
        if race.fell_back and s1.state_budget is not None and s1.baseline.state_bytes > s1.state_budget:
            # The default does not fit a binding memory budget: ship the candidate that lost least, flagged.
            ran = [r for r in race.rows if r.comparison is not None and not r.diverged]
            if not ran:
                raise TuneError("every race candidate within the memory budget diverged: no profile written")
            best = min(ran, key=lambda r: r.comparison.mean_diff if r.comparison else float("inf"))
            shipped = best.name
            notes.append(
                f"the default recipe does not fit --state-memory-budget: shipping {best.name}, the candidate within "
                f"it that lost least ({best.comparison.describe() if best.comparison else 'n/a'}); it did NOT pass"
            )
        shipped_contender = next(c for c in contenders if c.name == shipped)
    elif request.race.candidates > 0:
        shipped_contender = contenders[0]
        shipped = "default"
        notes.append("stage 1 found no profile predicted faster than the default: the default recipe ships")
    else:
        # --race-candidates 0: the stage-1 pick ships without proof (said so in the profile and on screen)
        unraced = build_contenders(s1.menus, s1.baseline, [s1.choice], lr, momentum, request.race.match_update_size)
        shipped_contender = unraced[-1] if s1.choice.picks != s1.baseline.picks else unraced[0]
        shipped = "stage 1 (unraced)"
        notes.append("race skipped (--race-candidates 0): this profile is unproven in training")

    state = state_summary(
        shipped_contender.assignment, s1.baseline, request.state_budget, _adamw_state_bytes(workload.model, shapes)
    )
    lr_info = {**lr.to_json(), "scales": _layer_scales(shipped_contender)}
    study_info = {
        "storage": storage,
        "stage1": s1.study_name,
        "stage2": s2.study_name if s2 else None,
        "race": race.study_name if race else None,
        "trials": request.trials,
        "lr_trials": request.lr_trials,
        "lr_steps": request.lr_steps,
        "lr_tuned_on": "default recipe (applied to every race contender)",
        "seed": request.seed,
        "target_alignment": request.target_alignment,
        "time_budget_ms": request.time_budget_s * 1e3 if request.time_budget_s is not None else None,
        "state_memory_budget": request.state_budget,
        "choice_source": s1.choice.source,
        "shipped": shipped,
        "baseline_time_ms": s1.baseline.time_s * 1e3,
        "baseline_alignment": s1.baseline.quality,
        "lr_val_loss": s2.best_value if s2 else None,
        "lr_default_val_loss": s2.default_value if s2 else None,
        "update_size_factors": shipped_contender.update_factors or None,
    }
    ladders = None
    if request.ladders:
        ladders = _ladders(s1.menus, shipped_contender.assignment.picks, lr, momentum, request.race.match_update_size)
        notes.append(
            f"adaptive ladders on {len(ladders)} layer(s), starting at the shipped recipes; the race proved those "
            "static recipes, not the adaptation: run `muonprof validate --profile PROFILE` (it races the static "
            "twin too)"
            if ladders
            else "--ladders: no layer has a second recipe on its stage-1 front that reports the same signal"
        )
    meta = bench.meta.get("device") or {}
    profile = build_profile(
        model=model,
        fingerprint=fingerprint,
        num_parameters=sum(p.numel() for p in workload.model.parameters()),
        shapes=shapes,
        menus=s1.menus,
        choice=shipped_contender.assignment,
        lr=lr_info,
        device={"type": meta.get("backend", request.device.type), "name": meta.get("name")},
        command=request.command,
        study=study_info,
        notes="; ".join(notes) or None,
        state=state,
        race={**race.to_json(), "reference_profile": contenders[0].profile} if race is not None else None,
        ladders=ladders,
    )
    save_profile(profile, out)
    return TuneOutcome(
        profile,
        out,
        model,
        storage,
        name,
        s1,
        s2,
        race,
        shipped,
        shipped_contender.assignment,
        lr,
        state,
        artifacts,
        notes,
    )


def _same_math(request: TuneRequest, s1: Stage1Result, candidates: Sequence[Assignment]) -> Assignment | None:
    """The race's same-math contender (``stage1.same_math``), unless turned off, already a candidate, or unable to
    fit a binding state-memory budget (it keeps the default's state, which then does not fit either)."""
    if not request.race.same_math or request.race.candidates <= 0:
        return None
    if s1.state_budget is not None and s1.baseline.state_bytes > s1.state_budget:
        return None
    found = same_math(s1.menus)
    if found is None or any(c.picks == found.picks for c in candidates):
        return None
    return found


def _race(
    request: TuneRequest,
    ui: Reporter,
    build: Callable[[int], Workload],
    contenders: list[Contender],
    s1: Stage1Result,
    storage: str,
    name: str,
    fingerprint: str,
    model: str,
) -> RaceResult:
    opts = request.race
    ui.stage(
        f"5/5 race: default + {len(contenders) - 1} candidates, {opts.seeds} paired seeds, horizons "
        f"{'/'.join(str(h) for h in opts.horizons())} steps, margin {opts.margin:g} nats"
        + (f", a passer confirmed at {opts.confirm_horizon} steps" if opts.confirm_horizon else "")
        + (f" (up to {opts.confirm_seeds} seeds if inconclusive)" if opts.extends_seeds else "")
    )
    with ui.track("race runs", 1) as update:

        def on_event(event: RaceEvent) -> None:
            if event.kind == "plan":
                update(0, total=event.total)
            elif event.kind == "done":
                update(event.done)
            elif event.kind == "finished":  # fewer runs than planned when a rung drops more than half
                update(event.done, total=event.total)

        return run_race(
            build,
            contenders,
            options=opts,
            menus=s1.menus,
            storage=storage,
            study_name=name,
            fingerprint=fingerprint,
            model=model,
            seed=request.seed,
            progress=on_event,
        )


def _ladders(
    menus: Sequence[LayerMenu],
    picks: Mapping[str, str],
    lr: LrChoice,
    momentum: Mapping[str, torch.Tensor] | None,
    match_update_size: bool,
) -> dict[str, dict[str, Any]]:
    """Per layer, a ladder from its stage-1 front around the shipped recipe (``writer.layer_ladder``), floor from
    the layer's last captured momentum spectrum; each rung gets the lr scale the race would train that recipe
    with, so a move changes the orthogonalizer, not the step size."""
    out: dict[str, dict[str, Any]] = {}
    for menu in menus:
        spectrum = momentum.get(menu.name) if momentum is not None else None
        if spectrum is None or menu.name not in picks:
            continue

        def scale(option: Option, menu: LayerMenu = menu, spectrum: torch.Tensor = spectrum) -> float:
            factor = (
                update_size_factors([menu], {menu.name: option.label}, {menu.name: spectrum})[menu.name]
                if match_update_size
                else 1.0
            )
            return lr.scales([menu], {menu.name: option.config})[menu.name] * factor

        ladder = layer_ladder(menu, picks[menu.name], spectrum, lr_scale=scale)
        if ladder is not None:
            out[menu.name] = ladder
    return out


def _layer_scales(contender: Contender) -> dict[str, float]:
    return {n: float(entry["lr_scale"]) for n, entry in contender.profile["layers"].items()}


def _source(request: TuneRequest) -> tuple[Spectra | None, str, dict[str, Any]]:
    """The spectra (when SOURCE is a spectra file), the model spec, and the data inputs."""
    inputs = {"overrides": dict(request.overrides), "data": request.data, "seq_len": request.seq_len}
    path = Path(request.source)
    if not path.is_file():
        return None, request.source, inputs
    spectra = load_spectra(path)
    meta = spectra.meta.get("model", {})
    spec = str(meta.get("spec"))
    if meta.get("source") == "in-loop recorder" and ":" not in spec and spec not in BUILTINS:
        raise TuneError(
            f"{path} was recorded in a training loop (model {spec!r}), and tune trains the model it tunes: record "
            "with SpectrumRecorder(..., name='package.module:factory'), a factory returning the model, its batches "
            f"and loss, or price the orthogonalizers alone with: muonprof bench {path}"
        )
    inputs["overrides"] = inputs["overrides"] or dict(meta.get("overrides") or {})
    inputs["data"] = request.data if request.data is not None else meta.get("data_option")
    inputs["seq_len"] = request.seq_len if request.seq_len is not None else meta.get("seq_len")
    return spectra, str(meta.get("spec")), inputs


def _search_inputs(request: TuneRequest, spectra: Spectra | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the spectra (and so every stage) are made from, by option name: the studies' keys and the capture
    digest. A spectra file given as SOURCE stands for its capture options (its own digest, or its metadata)."""
    data = _data_inputs(request, inputs)
    if spectra is not None:
        made_of = {k: v for k, v in spectra.meta.items() if k not in _VOLATILE_META}
        return {**data, "spectra file": spectra.meta.get("tune_inputs") or _digest(made_of)}
    return {
        **data,
        "--capture-steps": request.capture_steps,
        "--warmup-steps": request.warmup_steps,
        "--captures": request.captures,
        "--window": request.window,
    }


def _data_inputs(request: TuneRequest, inputs: dict[str, Any]) -> dict[str, Any]:
    """The options behind every training run (capture, stage 2, race): model overrides, data, batches, seed."""
    return {"--set": inputs["overrides"], "--data": inputs["data"], "--seq-len": inputs["seq_len"],
            "--batch-size": request.batch_size, "--seed": request.seed, "device": request.device.type}  # fmt: skip


def _reusable(path: Path, key: str, load: Callable[[Path], Any]) -> Any:
    """The artifact at ``path`` if it loads and was made for the same inputs (its ``meta["tune_inputs"]``)."""
    if not path.is_file():
        return None
    try:
        artifact = load(path)
    except ValueError:  # SpectraError / BenchError: a damaged or foreign file is simply not reused
        return None
    return artifact if artifact.meta.get("tune_inputs") == key else None


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _adamw_state_bytes(model: Any, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """State of the AdamW-routed parameters (fixed by the model: no profile changes it), float32."""
    from ..optim.routing import route_module
    from ..optim.state_memory import plans_state_bytes
    from ..profile import resolve_layers

    try:
        return plans_state_bytes(resolve_layers(None, shapes, route_module(model)).values())["adamw"]
    except ValueError:  # informational only: a routing problem surfaces when the profile is used
        return None


__all__ = ["Reporter", "Silent", "TuneOutcome", "TuneRequest", "run_tune"]
