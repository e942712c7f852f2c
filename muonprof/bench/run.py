"""``run_bench``: the library entry point (the ``bench`` command and ``tune`` both call it).

Order of work: probe the device (which dtypes it runs natively), time every unique (shape, candidate)
under telemetry, measure every candidate's accuracy on every benched layer's momentum spectrum, check
the spectral model against real bf16 runs, then derive the Pareto fronts and the whole-model summary.
Nothing is written here: the caller saves the result (atomically) once it is complete.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

from .._version import __version__
from ..capture import Spectra
from ..device import DeviceRates, TelemetrySampler, describe_device, measure_matmul, open_telemetry
from ..device.load import LoadProbe
from ..device.probe import Timer, default_timer
from ..interrupts import raise_if_interrupted
from .accuracy import (
    NEEDS_MATRICES,
    SPECTRAL,
    flush_denormals,
    model_check,
    snapshot_accuracy,
    snapshot_work,
    source_for,
)
from .artifact import BenchError, BenchResult
from .candidates import BASELINE, GridSpec, build_candidates, candidate_label, check_ranks, fits
from .cost import MEMORY_ESTIMATE, MEMORY_MEASURED, measure_costs, timing_method
from .multistep import layer_multistep
from .pareto import TARGET_ALIGNMENT, derive_fronts

RunProgress = Callable[[str, str, int, int], None]  # (phase, detail, done, total)
EMULATED_BELOW = 0.5  # bf16 matmul slower than half of fp32: the device emulates it
STATE_NOTE = (
    "Muon optimizer state per layer under each candidate (optim.state_memory.muon_state_bytes): the full "
    "momentum buffer, or a momentum_rank's factors (m + n + 1) r, plus a 4-byte step counter; float32 parameters"
)


def select_layers(spectra: Spectra, all_layers: bool = False) -> list[Any]:
    """The layers to bench: Muon-routed ones (all of them with ``all_layers``)."""
    layers = [layer for layer in spectra.layers if all_layers or layer.optimizer == "muon"]
    if not layers:
        raise BenchError("the spectra file has no Muon-routed layers; pass --all-layers to bench every matrix")
    return layers


def emulated_dtypes(rates: DeviceRates | None, grid: GridSpec) -> dict[str, str]:
    """dtype -> why it is skipped: bf16 when the device runs it far slower than fp32, unless asked for."""
    if rates is None or "dtypes" in grid.explicit:
        return {}
    ratio = rates.ratio("bf16")
    if ratio is not None and ratio < EMULATED_BELOW:
        return {
            "bfloat16": f"bf16 matmul runs at {ratio:.2g}x fp32 here (emulated): skipped; --dtype bf16 times it anyway"
        }
    return {}


def narrow_lowrank_dtypes(grid: GridSpec, rates: DeviceRates | None) -> GridSpec:
    """Unless --dtype was given, bench the low-rank family in the device's faster dtype only (GridSpec)."""
    if "dtypes" in grid.explicit or grid.lowrank_dtypes is not None or rates is None or len(grid.dtypes) < 2:
        return grid
    ratio = rates.ratio("bf16")
    if ratio is None:
        return grid
    best = "bfloat16" if ratio >= 1.0 else "float32"
    return dataclasses.replace(grid, lowrank_dtypes=(best,) if best in grid.dtypes else grid.dtypes)


def probe_rates(device: torch.device) -> tuple[DeviceRates, list[dict[str, Any]]]:
    """A quick bf16/fp32 matmul probe (about a second on CPU)."""
    results = measure_matmul(device, dtypes=("bf16", "fp32"), quick=True)
    return DeviceRates.from_results(results), [r.to_json() for r in results]


def run_bench(
    spectra: Spectra,
    *,
    device: torch.device,
    grid: GridSpec | None = None,
    seeds: int = 3,
    all_layers: bool = False,
    clock: Callable[[], float] | None = None,
    progress: RunProgress | None = None,
    rates: DeviceRates | None = None,
    probe: bool = True,
    spectra_path: str | None = None,
    command: str | None = None,
    check_seed: int = 0,
    timing: dict[str, Any] | None = None,
) -> BenchResult:
    """Bench ``grid`` on ``spectra``'s layers on ``device``; raises GridError / BenchError on bad input.

    ``clock`` replaces ``time.perf_counter`` in the timings (tests); ``rates`` skips the device probe
    (``probe=False`` skips it without rates: every dtype is timed); ``timing`` goes to ``cost.time_interleaved``.
    ``meta["load"]`` records how busy the machine was while timing (``device.load.LoadProbe``).
    """
    started = time.perf_counter()
    if seeds < 1:
        raise BenchError(f"--seeds must be at least 1, got {seeds}")
    say = progress or (lambda _p, _d, _i, _n: None)
    layers = select_layers(spectra, all_layers)
    grid, notes = check_ranks(grid or GridSpec(), [layer.matrix_shape for layer in layers])
    shapes = dict(Counter(tuple(layer.matrix_shape) for layer in layers))

    probe_rows: list[dict[str, Any]] = []
    if rates is None and probe:
        say("probe", "bf16/fp32 matmul probe", 0, 1)
        rates, probe_rows = probe_rates(device)
        say("probe", "done", 1, 1)
    skip = emulated_dtypes(rates, grid)
    grid = narrow_lowrank_dtypes(grid, rates)
    candidates = build_candidates(grid)
    notes += [f"{dtype}: {why}" for dtype, why in skip.items()]

    timer: Timer = Timer(clock=clock) if clock is not None else default_timer(device)
    telemetry, telemetry_notes = open_telemetry(device)
    load = LoadProbe()
    try:
        with TelemetrySampler(telemetry, interval_s=0.5) as sampler:
            costs = measure_costs(
                shapes,
                candidates,
                device,
                timer=timer,
                skip_dtypes=skip,
                progress=lambda d, i, n: say("timing", d, i, n),
                **(timing or {}),
            )
        telemetry_summary = sampler.summary()
        load_record = load.record()
    finally:
        telemetry.close()
    if telemetry_summary.get("throttled"):
        notes.append(f"the device was throttled while timing: {telemetry_summary.get('throttle_reason')}")

    skipped = {(c.shape, c.label): c.skipped for c in costs if c.skipped}
    momentum = spectra.captures[-1].momentum
    snapshots = post_burn_in(spectra)
    saved = (spectra.matrices or {}).get("momentum") or {}
    accuracy: dict[str, dict[str, dict[str, Any]]] = {}
    plan: dict[str, tuple[list[Any], list[Any]]] = {}
    for layer in layers:
        shape = tuple(layer.matrix_shape)
        fitting = [c for c in candidates if fits(c, shape)]
        measured = [c for c in fitting if source_for(c) == SPECTRAL or (shape, candidate_label(c)) not in skipped]
        plan[layer.name] = (fitting, measured)
    total = sum(snapshot_work(m, len(snapshots)) + len(f) - len(m) for f, m in plan.values())
    done = 0
    for layer in layers:
        shape = tuple(layer.matrix_shape)
        fitting, measured = plan[layer.name]
        say("accuracy", layer.name, done, total)

        def tick(name: str = layer.name) -> None:
            nonlocal done
            raise_if_interrupted()
            done += 1
            say("accuracy", name, done, total)

        table = snapshot_accuracy(
            [(c.step, c.momentum[layer.name]) for c in snapshots],
            measured,
            seeds=seeds,
            device=device,
            matrix=saved.get(layer.name),
            matrix_step=spectra.matrices_step,
            tick=tick,
            shape=shape,
        )
        for c in fitting:  # randomized candidates whose timing was skipped: not simulated either
            if c not in measured:
                table[candidate_label(c)] = {"source": "skipped", "reason": skipped[(shape, candidate_label(c))]}
                tick()
        accuracy[layer.name] = table
    windowed = add_multistep(spectra, layers, candidates, accuracy, say)
    if windowed:
        notes.append(
            f"multi-step accuracy on {windowed} layer(s) from the captured gradient window: stage 1 ranks "
            "candidates by multistep_alignment there (one-step alignment elsewhere)"
        )

    check_layers = _model_check_layers(layers, momentum, check_seed)
    check_total = len(check_layers) * 3
    say("model check", "", 0, check_total)
    counter = iter(range(1, check_total + 1))
    check = model_check(
        check_layers, device=device, seed=check_seed, tick=lambda: say("model check", "", next(counter), check_total)
    )

    layer_records = [
        {"name": layer.name, "matrix_shape": list(layer.matrix_shape), "role": layer.role, "optimizer": layer.optimizer}
        for layer in layers
    ]
    result = BenchResult(
        meta={},
        layers=layer_records,
        costs=costs,
        accuracy=accuracy,
        model_check=check,
    )
    derive(result)
    if any(m.get("source") == NEEDS_MATRICES for t in accuracy.values() for m in t.values()):
        notes.append("column selection needs the real matrices: capture with --save-matrices to bench it")
    result.meta = {
        "device": describe_device(device).to_json(),
        "matmul": {"rates": rates.to_json() if rates else None, "probe": probe_rows},
        "telemetry": {**telemetry_summary, "notes": telemetry_notes},
        "spectra": {
            "path": spectra_path,
            "fingerprint": spectra.meta.get("fingerprint"),
            "model": spectra.meta.get("model"),
            "capture_step": spectra.captures[-1].step,
            "warmup_steps": spectra.warmup_steps,
            "snapshot_steps": [c.step for c in snapshots],
            "matrices_saved": spectra.matrices is not None,
        },
        "grid": grid.to_json(),
        "candidates": len(candidates),
        "seeds": seeds,
        "all_layers": all_layers,
        "skipped_dtypes": skip,
        "timing_mode": "batched same-shape call" if device.type != "cpu" else "one matrix per call (x layer count)",
        "timing": timing_method(timing or {}),
        "load": load_record,
        "memory_source": MEMORY_MEASURED if device.type == "cuda" else MEMORY_ESTIMATE,
        "state_bytes": STATE_NOTE,
        "notes": notes,
        "versions": {"muonprof": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "command": command or " ".join(sys.argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    return result


def add_multistep(
    spectra: Spectra,
    layers: list[Any],
    candidates: list[Any],
    accuracy: dict[str, dict[str, dict[str, Any]]],
    say: RunProgress | None = None,
) -> int:
    """Add ``multistep_*`` figures (``bench.multistep``) beside the one-step ones, for every measured candidate
    on every layer the spectra's gradient window covers; returns how many layers that was.

    The window (``spectra.window``, None or absent before captures had one) has ``grads`` (layer ->
    float32 (T, m, n)) and ``momentum`` (layer -> the EMA buffer before the first gradient; may be missing).
    """
    window = getattr(spectra, "window", None)
    grads = getattr(window, "grads", None) or {}
    momenta = getattr(window, "momentum", None) or {}
    todo = [layer for layer in layers if layer.name in grads]
    for i, layer in enumerate(todo):
        if say is not None:
            say("multi-step", layer.name, i, len(todo))
        table = accuracy.get(layer.name, {})
        shape = tuple(layer.matrix_shape)
        window_grads = grads[layer.name].reshape(-1, *shape).float()
        initial = momenta.get(layer.name)
        initial = initial.reshape(shape).float() if initial is not None else None
        scored = [c for c in candidates if "alignment" in table.get(candidate_label(c), {})]
        with flush_denormals():
            figures = layer_multistep(window_grads, initial, scored)
        for label, values in figures.items():
            table[label].update(values)
    if say is not None and todo:
        say("multi-step", "done", len(todo), len(todo))
    return len(todo)


def post_burn_in(spectra: Spectra) -> list[Any]:
    """The captures accuracy is scored on: all after the burn-in (files without one: every capture)."""
    return [c for c in spectra.captures if c.step > spectra.warmup_steps] or spectra.captures[-1:]


def _model_check_layers(layers: list[Any], momentum: dict[str, torch.Tensor], seed: int) -> list[Any]:
    """One layer per role, picked with a seeded RNG (the check costs a full SVD per layer)."""
    rng = random.Random(seed)
    by_role: dict[str, list[Any]] = {}
    for layer in layers:
        by_role.setdefault(layer.role, []).append(layer)
    picked = [rng.choice(by_role[role]) for role in sorted(by_role)]
    return [(layer.name, tuple(layer.matrix_shape), momentum[layer.name]) for layer in picked]


def derive(result: BenchResult, target: float = TARGET_ALIGNMENT) -> None:
    """Fill ``fronts`` (per layer and per role; ``roles_state``: per role, optimizer-state bytes vs
    alignment) and ``summary`` from costs and accuracy (``pareto.derive_fronts``). Every point carries
    ``state_bytes``."""
    result.fronts, result.summary = derive_fronts(
        result.layers,
        result.accuracy,
        result.per_layer_costs(),
        result.per_layer_state(),
        candidate_label(BASELINE),
        target,
    )
