"""Race the contenders on real training: same init, same batches, same steps, per seed.

For every seed and every contender a FRESH workload is built with ``build_workload(spec, seed=seed, ...)``:
the model's initial weights and batch ``k`` are functions of the seed only, so all contenders of a seed start
from the same parameters and see the same batch sequence; only the optimizer differs. Everything that can
be refused (unknown model, bad data options, a profile for another model, an unknown contender) is refused
before the first training step.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..device.load import load_average
from ..profile import fingerprint, has_ladders, load_profile
from ..stats import DEFAULT_MARGIN, check_margin
from ..train import RankSync, TrainResult, train
from ..workload import Workload, build_workload
from .contenders import ContenderSkipped, build_contender, parse_contenders
from .results import ContenderRuns, ValidationResult, choose_reference


def single_process() -> dict[str, Any]:
    """``meta["distributed"]`` of an ordinary (one-process) run."""
    return {"nproc": 1, "world_size": 1, "backend": None}

if TYPE_CHECKING:
    from .distributed import DistributedRun

DEFAULT_STEPS = 200


class ValidationError(ValueError):
    """Options that cannot give a comparison (no steps, a time budget shorter than one step); one line."""


@dataclass
class ProgressEvent:
    """What ``progress`` is told: ``start`` / ``step`` / ``eval`` / ``done`` of a run, ``stored`` for a run
    taken from ``resume`` instead of trained, or ``skipped``."""

    kind: str
    contender: str
    seed: int
    step: int = 0
    total: int = 0
    loss: float | None = None
    result: TrainResult | None = None
    message: str | None = None


def default_eval_every(steps: int) -> int:
    """About 20 evaluations per run."""
    return max(1, steps // 20)


def seed_list(seeds: int | Sequence[int], seed: int = 0) -> list[int]:
    """``seeds`` consecutive seeds from ``seed``, or the given list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValidationError(f"--seeds must be at least 1, got {seeds}")
        return list(range(seed, seed + seeds))
    out = list(dict.fromkeys(int(s) for s in seeds))
    if not out:
        raise ValidationError("no seeds given")
    return out


def validate(
    spec: str,
    *,
    profile: str | os.PathLike[str] | dict[str, Any] | None = None,
    contenders: str | Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    time_budget_s: float | None = None,
    seeds: int | Sequence[int] = 1,
    seed: int = 0,
    eval_every: int | None = None,
    data: str | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    lr: float | None = None,
    adamw_lr: float | None = None,
    baseline_lr: float | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    command: str | None = None,
    distributed: DistributedRun | None = None,
    reference: str | None = None,
    margin: float = DEFAULT_MARGIN,
    resume: Mapping[tuple[str, int], TrainResult] | None = None,
) -> ValidationResult:
    """Train ``spec`` once per (seed, contender) and return the runs with their summary.

    ``contenders``: the ``--against`` list (comma-separated or a list; default default,torch,adamw); with a
    ``profile`` the ``profile`` contender runs first. ``seeds``: a count (from ``seed``) or a list.
    Raises ValidationError, ContenderError, ProfileError, ModelSpecError, DataError, WorkloadError (all
    before training, except a time budget shorter than the first step, raised after that step).
    ``distributed``: run as one rank of ``validate --nproc N`` (see ``validate.distributed``); every rank
    calls this with the same arguments. ``reference``: the contender the others are judged against (default:
    ``default`` when it runs, else the first); ``margin``: the loss increase (nats) still non-inferior.
    ``resume``: finished runs by (contender, seed) from an interrupted call with the same inputs (see
    ``validate.checkpoint``); they are taken as they are (progress gets a ``stored`` event) instead of
    trained again, and named in ``meta["resumed_runs"]``.
    """
    if steps < 1:
        raise ValidationError(f"--steps must be at least 1, got {steps}")
    every = default_eval_every(steps) if eval_every is None else eval_every
    if every < 1:
        raise ValidationError(f"--eval-every must be at least 1, got {every}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValidationError(f"--time-budget must be > 0 seconds, got {time_budget_s}")
    loaded_profile = load_profile(profile) if profile is not None else None
    names = parse_contenders(contenders, with_profile=profile is not None, adaptive=has_ladders(loaded_profile))
    reference, margin = check_judging(names, reference, margin)
    seed_values = seed_list(seeds, seed)
    device = torch.device(device)
    load = dict(overrides=overrides, data=data, batch_size=batch_size, seq_len=seq_len, device=device)
    options = dict(lr=lr, adamw_lr=adamw_lr, baseline_lr=baseline_lr)

    # Preflight: build the workload and every contender once, so that a bad model, data option or profile
    # fails in a second, before any training; and warm each contender up with two untimed steps on a
    # throwaway model (one-time costs: allocator, kernel selection, lazy init), timing the second one to
    # refuse a time budget shorter than a step before the race starts.
    first = _workload(spec, seed_values[0], load, distributed)
    initial = {k: v.clone() for k, v in first.model.state_dict().items()}
    runs: dict[str, ContenderRuns] = {}
    warm_step_s: dict[str, float] = {}
    for name in names:
        first.model.load_state_dict(initial)
        try:
            built = build_contender(name, first.model, profile=loaded_profile, seed=seed_values[0], **options)
        except ContenderSkipped as why:
            runs[name] = ContenderRuns(name, skipped=str(why))
            if progress is not None:
                progress(ProgressEvent("skipped", name, seed_values[0], message=str(why)))
            continue
        config = dict(built.config)
        if name == "profile":
            config["profile"] = _profile_label(profile)
        runs[name] = ContenderRuns(name, config)
        warm_step_s[name] = _warm_up(first, built.optimizer)
    if reference is not None and runs[reference].skipped is not None:
        raise ValidationError(f"--reference {reference!r} cannot run: {runs[reference].skipped}")
    if distributed is not None and warm_step_s:  # every rank must take the same decision: the slowest's
        warm_step_s = dict(zip(warm_step_s, distributed.sync.reduce(list(warm_step_s.values()), "max")))
    too_slow = {n: t for n, t in warm_step_s.items() if time_budget_s is not None and t >= time_budget_s}
    if too_slow:
        name, t = max(too_slow.items(), key=lambda kv: kv[1])
        raise ValidationError(
            f"--time-budget {time_budget_s:g} s is shorter than one training step ({t:.3g} s for contender "
            f"{name!r}); give a budget of many steps"
        )
    meta = _meta(spec, first, profile, loaded_profile, device, names, seed_values, steps, time_budget_s, every, command)
    meta["options"] = {k: v for k, v in options.items() if v is not None}
    meta["warmup_step_s"] = warm_step_s
    meta["distributed"] = single_process() if distributed is None else distributed.describe(first.batch_size)
    meta["judging"] = {"reference": reference, "max_loss_increase": margin}
    del first, initial

    stored = dict(resume or {})
    meta["resumed_runs"] = []
    for s in seed_values:
        for name in names:
            entry = runs[name]
            if entry.skipped is not None:
                continue
            if (name, s) in stored:
                entry.runs[s] = stored[(name, s)]
                meta["resumed_runs"].append({"contender": name, "seed": s})
                if progress is not None:
                    done = entry.runs[s]
                    progress(ProgressEvent("stored", name, s, step=done.steps_done, total=steps, result=done))
                continue
            workload = _workload(spec, s, load, distributed)
            built = build_contender(name, workload.model, profile=loaded_profile, seed=s, **options)
            sync = None if distributed is None else distributed.sync
            entry.runs[s] = _run_one(
                workload, built.optimizer, name, s, steps, every, time_budget_s, progress, clock, sync
            )
    meta["cpu_load_after"] = load_average()
    result = ValidationResult(meta, seed_values, runs)
    result.summarize(reference=reference, margin=margin)
    return result


def check_judging(names: Sequence[str], reference: str | None, margin: float) -> tuple[str | None, float]:
    """``(reference, margin)`` checked before any training: ValidationError (one line) for a ``--reference``
    that is not among the contenders or a negative / non-finite ``--max-loss-increase``."""
    try:
        margin = check_margin(margin, "--max-loss-increase")
        if reference is not None:
            choose_reference(names, reference)
    except ValueError as err:
        raise ValidationError(str(err)) from None
    return reference, margin


def _workload(spec: str, seed: int, load: dict[str, Any], distributed: DistributedRun | None) -> Workload:
    workload = build_workload(spec, seed=seed, **load)
    return workload if distributed is None else distributed.wrap(workload)


def _warm_up(workload: Workload, optimizer: Any, steps: int = 2) -> float:
    """Run ``steps`` untimed training steps; return the wall time of the last one (device-synchronized).

    An optimizer that ``needs_closure`` is stepped with one, as ``train()`` does (its second step is then
    the two-gradient step a storm optimizer takes from its second step on).
    """
    sync = torch.cuda.synchronize if next(workload.model.parameters()).is_cuda else (lambda: None)
    use_closure = bool(getattr(optimizer, "needs_closure", False))
    elapsed = 0.0
    workload.model.train()
    for k in range(steps):
        sync()
        t0 = time.perf_counter()
        batch = workload.train_batch(k)
        if use_closure:
            rng = torch.get_rng_state()

            def closure(batch: Any = batch, rng: torch.Tensor = rng) -> torch.Tensor:
                torch.set_rng_state(rng)
                with torch.enable_grad():
                    optimizer.zero_grad(set_to_none=True)
                    loss = workload.loss(batch)
                    loss.backward()
                return loss

            optimizer.step(closure)
        else:
            optimizer.zero_grad(set_to_none=True)
            workload.loss(batch).backward()
            optimizer.step()
        sync()
        elapsed = time.perf_counter() - t0
    optimizer.zero_grad(set_to_none=True)
    return elapsed


def _run_one(
    workload: Workload,
    optimizer: Any,
    name: str,
    seed: int,
    steps: int,
    every: int,
    time_budget_s: float | None,
    progress: Callable[[ProgressEvent], None] | None,
    clock: Callable[[], float],
    sync: RankSync | None = None,
) -> TrainResult:
    if progress is not None:
        progress(ProgressEvent("start", name, seed, total=steps))
    elapsed = 0.0
    last_clock: list[float] = []

    def timed_clock() -> float:
        now = clock()
        last_clock.append(now)
        return now

    def on_step(step: int, loss: float) -> None:
        nonlocal elapsed
        if step == 1 and time_budget_s is not None and steps > 1:
            # Every clock read so far was during step 1 (train() times evaluation with its own timer).
            elapsed = last_clock[-1] - last_clock[0]
            if sync is not None:  # the slowest rank's, so that every rank refuses or none does
                elapsed = sync.reduce([elapsed], "max")[0]
            if elapsed >= time_budget_s:
                raise ValidationError(
                    f"--time-budget {time_budget_s:g} s is shorter than one training step "
                    f"({elapsed:.3g} s for contender {name!r}); give a budget of many steps"
                )
        if progress is not None:
            progress(ProgressEvent("step", name, seed, step=step, total=steps, loss=loss))

    def on_eval(step: int, val_loss: float | None) -> None:
        if progress is not None:
            progress(ProgressEvent("eval", name, seed, step=step, total=steps, loss=val_loss))

    result = train(
        workload,
        optimizer,
        steps=steps,
        eval_every=every,
        time_budget_s=time_budget_s,
        on_step=on_step,
        on_eval=on_eval,
        clock=timed_clock,
        sync=sync,
    )
    if progress is not None:
        progress(ProgressEvent("done", name, seed, step=result.steps_done, total=steps, result=result))
    return result


def _meta(
    spec: str,
    workload: Workload,
    profile_path: Any,
    profile: Any,
    device: torch.device,
    names: list[str],
    seeds: list[int],
    steps: int,
    time_budget_s: float | None,
    eval_every: int,
    command: str | None,
) -> dict[str, Any]:
    named = [(n, tuple(p.shape)) for n, p in workload.model.named_parameters() if p.requires_grad]
    profile_meta = None
    if profile is not None:
        model_info = profile.model
        profile_meta = {
            "path": _profile_label(profile_path),
            "model": model_info.name if model_info else None,
            "fingerprint": model_info.fingerprint if model_info else None,
            "layer_entries": len(profile.layers),
        }
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(["muonprof", *sys.argv[1:]]),
        "model": workload.describe(),
        "fingerprint": fingerprint(named),
        "num_parameters": sum(p.numel() for p in workload.model.parameters() if p.requires_grad),
        "profile": profile_meta,
        "contenders": names,
        "seeds": seeds,
        "steps": steps,
        "time_budget_s": time_budget_s,
        "eval_every": eval_every,
        "device": str(device),
        "device_name": _device_name(device),
        "host": socket.gethostname(),
        "versions": {
            "muonprof": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "torch_threads": torch.get_num_threads(),
        "cpu_load_before": load_average(),
        "peak_memory": (
            "cuda: torch.cuda.max_memory_allocated per run; cpu: the whole process's peak RSS, reset per run "
            "on Linux (VmHWM), else the process-wide high-water mark since start"
        ),
    }


def _profile_label(profile: Any) -> str:
    return str(profile) if isinstance(profile, (str, os.PathLike)) else "(in memory)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()




__all__ = [
    "DEFAULT_STEPS",
    "ProgressEvent",
    "ValidationError",
    "check_judging",
    "default_eval_every",
    "seed_list",
    "validate",
]
