"""``muonprof tune``: from a model (or its spectra / bench files) to a per-layer profile, resumably."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, err_console, fail, safe_name


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)


def tune_command(
    source: Annotated[str, typer.Argument(help="MODEL (built-in, module:factory, hf:PATH) or a spectra file.")],
    bench_file: Annotated[Path | None, typer.Option("--bench", help="A bench file (default: run bench).")] = None,
    target_alignment: Annotated[
        float | None,
        typer.Option("--target-alignment", help="Fastest profile with this descent share (default: the default's)."),
    ] = None,
    time_budget_ms: Annotated[
        float | None, typer.Option("--time-budget-ms", help="Best profile within this orthogonalization time.")
    ] = None,
    state_memory_budget: Annotated[
        str | None,
        typer.Option(
            "--state-memory-budget",
            metavar="SIZE",
            help="Most Muon optimizer state for the whole model, e.g. 512MB, 1.5GiB, 2e9: the momentum buffers "
            "(or low-rank momentum_rank factors) and step counters of the Muon layers, fp32. AdamW state is "
            "fixed and reported apart.",
        ),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", help="Stage-1 Optuna trials (cheap: no training).")] = 300,
    lr_trials: Annotated[int, typer.Option("--lr-trials", help="Stage-2 training trials (0 skips stage 2).")] = 12,
    lr_steps: Annotated[int, typer.Option("--lr-steps", help="Training steps per stage-2 trial.")] = 60,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Stage-2 pruning interval.")] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median or hyperband.")] = "median",
    floor: Annotated[float, typer.Option("--min-layer-alignment", help="No layer below this.")] = 0.5,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage URL or journal:PATH (default: SQLite by --out).")
    ] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Resume or share this study.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds samplers, init and batches.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Profile to write (default MODEL.profile.json).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the stage-1 Pareto front.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    capture_steps: Annotated[int, typer.Option("--capture-steps", help="Steps when capturing spectra.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for capture and stage 2.")] = 8,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Sequence length (language models).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training data (see `muonprof spectrum`).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model override key=value.")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Bench grid: methods (when benching).")] = None,
    ranks: Annotated[str | None, typer.Option("--ranks", help="Bench grid: ranks (when benching).")] = None,
) -> None:
    """Pick per-layer orthogonalizers (stage 1) and LR scaling (stage 2) with Optuna; write a profile."""
    import torch

    from .._files import OutputPathError, check_writable
    from ..bench import BenchError, GridError, load_bench, parse_grid, run_bench, save_bench
    from ..capture import CaptureError, SpectraError, capture_spectra, load_spectra, save_spectra
    from ..data import DataError
    from ..device import DeviceError, resolve_device
    from ..models import ModelSpecError, parse_overrides
    from ..profile import save_profile
    from ..tune import TuneError, build_profile, default_storage, default_study_name, tune_stage1, tune_stage2
    from ..tune.writer import state_summary
    from ..workload import WorkloadError, build_workload

    if trials < 1:
        fail(f"--trials must be at least 1, got {trials}", 2)
    if lr_trials < 0 or lr_steps < 1:
        fail("--lr-trials must be >= 0 and --lr-steps >= 1", 2)
    if target_alignment is not None and time_budget_ms is not None:
        fail("give --target-alignment or --time-budget-ms, not both", 2)
    if target_alignment is not None and not 0 < target_alignment <= 1:
        fail(f"--target-alignment must be in (0, 1], got {target_alignment}", 2)
    if time_budget_ms is not None and time_budget_ms <= 0:
        fail(f"--time-budget-ms must be positive, got {time_budget_ms}", 2)
    if pruner not in ("median", "hyperband"):
        fail(f"--pruner must be median or hyperband, got {pruner!r}", 2)
    state_budget = None
    if state_memory_budget is not None:
        from ..optim.state_memory import parse_bytes

        try:
            state_budget = parse_bytes(state_memory_budget)
        except ValueError as err:
            fail(f"--state-memory-budget: {err}", 2)
    shown = err_console if as_json else console
    command = " ".join(["muonprof", *sys.argv[1:]])

    spectra = None
    source_path = Path(source)
    try:
        torch_device = resolve_device(device)
        overrides = parse_overrides(set_ or [])
        if source_path.is_file():
            spectra = load_spectra(source_path)
            model_meta = spectra.meta.get("model", {})
            model = str(model_meta.get("spec"))
            overrides = overrides or dict(model_meta.get("overrides") or {})
            data = data if data is not None else model_meta.get("data_option")
            seq_len = seq_len if seq_len is not None else model_meta.get("seq_len")
        else:
            model = source
        out = out if out is not None else Path(f"{safe_name(model)}.profile.json")
        check_writable(out)
        if plot is not None:
            check_writable(plot)
        storage_url = storage or default_storage(out)

        def build() -> Any:
            return build_workload(
                model, overrides=overrides, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed,
                device=torch_device,
            )  # fmt: skip

        workload = build()
        from ..profile import fingerprint as fingerprint_of

        shapes = {n: tuple(p.shape) for n, p in workload.model.named_parameters() if p.requires_grad}
        fingerprint = fingerprint_of(shapes.items())
        if spectra is not None and spectra.meta.get("fingerprint") not in (None, fingerprint):
            raise TuneError(f"{source}: the spectra were captured on another model ({spectra.meta['fingerprint']})")
        name = study_name or default_study_name(model, fingerprint)
        bench = load_bench(bench_file) if bench_file is not None else None
        grid = parse_grid(methods=methods, ranks=ranks) if (methods or ranks) else None
    except (ModelSpecError, DataError, WorkloadError, DeviceError, OutputPathError, SpectraError) as err:
        fail(str(err), 2)
    except (BenchError, GridError, TuneError) as err:
        fail(str(err), 2)

    try:
        if spectra is None and bench is None:
            shown.print(f"[bold]1/4 capture[/]: {capture_steps} training steps of {model} for its spectra")
            with _progress(shown, as_json) as progress:
                task = progress.add_task("capture", total=capture_steps)
                spectra = capture_spectra(
                    workload, steps=capture_steps, every=max(1, capture_steps), seed=seed,
                    on_step=lambda step, loss: progress.update(task, completed=step), command=command,
                )  # fmt: skip
            save_spectra(spectra, out.with_name(out.stem + ".spectra.pt"))
        if bench is None:
            assert spectra is not None
            shown.print(f"[bold]2/4 bench[/]: orthogonalizer cost and accuracy on {torch_device}")
            with _progress(shown, as_json) as progress:
                tasks: dict[str, Any] = {}

                def on_bench(phase: str, detail: str, done: int, total: int) -> None:
                    if phase not in tasks:
                        tasks[phase] = progress.add_task(phase, total=max(total, 1))
                    progress.update(tasks[phase], completed=done, total=max(total, 1))

                bench = run_bench(spectra, device=torch_device, grid=grid, progress=on_bench, command=command)
            save_bench(bench, out.with_name(out.stem + ".bench.json"))
        from ..tune.run import check_bench_matches

        check_bench_matches(bench, spectra, fingerprint)

        # Under a binding memory budget stage 1 uses its own study ({name}-ortho-memory); the line after
        # the trials names the one actually used.
        shown.print(f"[bold]3/4 orthogonalizers[/]: Optuna studies in {storage_url}")
        with _progress(shown, as_json) as progress:
            task = progress.add_task("stage 1 trials", total=trials)
            s1 = tune_stage1(
                bench, spectra, storage=storage_url, study_name=name, fingerprint=fingerprint, model=model,
                trials=trials, seed=seed, target_alignment=target_alignment,
                time_budget_s=time_budget_ms / 1e3 if time_budget_ms is not None else None, floor=floor,
                on_trial=lambda study, trial: progress.update(task, completed=_finished(study)),
                state_budget=state_budget,
            )  # fmt: skip
            progress.update(task, completed=trials)
        shown.print(f"    study {s1.study_name}: {s1.trials_run} trials run now")
        picks = {m.name: m.option(s1.choice.picks[m.name]).config for m in s1.menus}

        s2 = None
        if lr_trials > 0:
            every = eval_every or max(1, lr_steps // 4)
            shown.print(f"[bold]4/4 learning rates[/]: {lr_trials} trials x {lr_steps} steps, study {name}-lr")
            with _progress(shown, as_json) as progress:
                task = progress.add_task("stage 2 trials", total=lr_trials)
                s2 = tune_stage2(
                    build, s1.menus, picks, storage=storage_url, study_name=name, fingerprint=fingerprint,
                    model=model, trials=lr_trials, steps=lr_steps, eval_every=every, seed=seed, pruner=pruner,
                    on_trial=lambda study, trial: progress.update(task, completed=_finished(study)),
                )  # fmt: skip
    except KeyboardInterrupt:
        fail(
            f"interrupted: finished trials are stored in {storage_url} (study {name}); "
            "run the same command again to continue. No profile written.",
            130,
        )
    except (BenchError, GridError, TuneError, SpectraError, CaptureError) as err:
        fail(str(err), 2 if not isinstance(err, CaptureError) else 1)
    except torch.OutOfMemoryError:
        fail(f"out of memory on {torch_device}; try a smaller --batch-size or --seq-len. No profile written.")

    lr_info: dict[str, Any] = {}
    if s2 is not None:
        lr_info = {**s2.choice.to_json(), "scales": s2.scales}
    study_info = {
        "storage": storage_url,
        "stage1": s1.study_name,
        "stage2": s2.study_name if s2 else None,
        "trials": trials,
        "lr_trials": lr_trials,
        "lr_steps": lr_steps,
        "seed": seed,
        "target_alignment": target_alignment,
        "time_budget_ms": time_budget_ms,
        "state_memory_budget": state_budget,
        "choice_source": s1.choice.source,
        "baseline_time_ms": s1.baseline.time_s * 1e3,
        "baseline_alignment": s1.baseline.quality,
        "lr_val_loss": s2.best_value if s2 else None,
        "lr_default_val_loss": s2.default_value if s2 else None,
    }
    meta = (bench.meta.get("device") or {}) if bench is not None else {}
    state = state_summary(s1.choice, s1.baseline, state_budget, _adamw_state_bytes(workload.model, shapes))
    profile = build_profile(
        model=model,
        fingerprint=fingerprint,
        num_parameters=sum(p.numel() for p in workload.model.parameters()),
        shapes=shapes,
        menus=s1.menus,
        choice=s1.choice,
        lr=lr_info,
        device={"type": meta.get("backend", torch_device.type), "name": meta.get("name")},
        command=command,
        study=study_info,
        notes="; ".join(s1.notes) or None,
        state=state,
    )
    save_profile(profile, out)
    if plot is not None:
        from ..plots.tune import plot_front

        plot_front(s1, plot)

    speedup = s1.baseline.time_s / s1.choice.time_s if s1.choice.time_s > 0 else float("inf")
    result = {
        "profile": str(out),
        "storage": storage_url,
        "study": name,
        "baseline": s1.baseline.to_json(),
        "choice": s1.choice.to_json(),
        "speedup": speedup,
        "front": [a.to_json() | {"picks": None} for a in s1.front],
        "stage1_trials_run": s1.trials_run,
        "lr": lr_info or None,
        "lr_val_loss": s2.best_value if s2 else None,
        "lr_default_val_loss": s2.default_value if s2 else None,
        "state_memory": state,
        "notes": s1.notes,
    }
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    console.print(_front_table(s1))
    choice = s1.choice
    console.print(
        f"chosen ({choice.source}): {choice.time_s * 1e3:.3g} ms per step vs default {s1.baseline.time_s * 1e3:.3g} ms "
        f"({speedup:.2f}x), descent share {choice.quality:.4f} vs {s1.baseline.quality:.4f}, "
        f"worst layer {choice.worst:.3f}"
    )
    console.print(_state_line(state), highlight=False)
    for note in s1.notes:
        if "memory" in note:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    if s2 is not None:
        default = f"{s2.default_value:.4f}" if s2.default_value is not None else "n/a"
        console.print(
            f"learning rate: rule {s2.choice.lr_rule}, base lr {s2.choice.base_lr:.4g}; val loss {s2.best_value:.4f} "
            f"(default settings {default}); {s2.finished} trials, {s2.pruned} pruned"
        )
    console.print(f"wrote {out}" + (f" and {plot}" if plot else "") + f"; study {name} in {storage_url}")


def _adamw_state_bytes(model: Any, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """State of the AdamW-routed parameters (fixed by the model: no profile changes it), float32."""
    from ..optim.routing import route_module
    from ..optim.state_memory import plans_state_bytes
    from ..profile import resolve_layers

    try:
        return plans_state_bytes(resolve_layers(None, shapes, route_module(model)).values())["adamw"]
    except ValueError:  # informational only: a routing problem surfaces when the profile is used
        return None


def _state_line(state: dict[str, Any]) -> str:
    from ..optim.state_memory import format_bytes

    budget = f" (budget {format_bytes(state['budget'])})" if state.get("budget") is not None else ""
    adamw = f"; AdamW {format_bytes(state['adamw'])} (fixed)" if state.get("adamw") is not None else ""
    return (
        f"optimizer state (fp32): Muon {format_bytes(state['muon'])} vs default {format_bytes(state['muon_default'])}"
        f"{budget}{adamw}"
    )


def _front_table(s1: Any) -> Table:
    from ..optim.state_memory import format_bytes

    memory = s1.state_budget is not None
    title = "stage 1: Pareto-optimal profiles (time per optimizer step vs descent share)"
    table = Table(title=title + (" within the state-memory budget" if memory else ""))
    columns = ("", "time ms", "speedup", "descent share", "worst layer", *(("Muon state",) if memory else ()), "from")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("", "from") else "left")
    base = s1.baseline.time_s
    shown = s1.front if len(s1.front) <= 12 else [*s1.front[:: max(1, len(s1.front) // 12)], s1.front[-1]]
    if s1.choice not in shown:
        shown = sorted([*shown, s1.choice], key=lambda a: a.time_s)
    for a in shown:
        mark = "→" if a is s1.choice else ""
        state = (format_bytes(a.state_bytes),) if memory else ()
        table.add_row(
            mark, f"{a.time_s * 1e3:.4g}", f"{base / a.time_s:.2f}x" if a.time_s else "-", f"{a.quality:.4f}",
            f"{a.worst:.3f}", *state, a.source,
        )  # fmt: skip
    return table


def _finished(study: Any) -> int:
    from ..tune.study import finished_trials

    return len(finished_trials(study, searched_only=True))


def _progress(shown: Any, transient: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=shown,
        transient=transient,
    )
