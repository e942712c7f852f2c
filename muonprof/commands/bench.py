"""``muonprof bench``: what each orthogonalizer costs on this device and how accurate it is on this model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, description_column, err_console, fail, field_column, in_range, safe_name, styled

CAPTURE_STEPS = 10


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def bench_command(
    source: Annotated[
        str,
        typer.Argument(metavar="SPECTRA|MODEL", help="A spectra file (`muonprof spectrum`), or a model to capture."),
    ],
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma list of newton_schulz, svd, lowrank, rsvd, subset, momentum_rank (LiMuon's low-rank "
            "momentum), error_feedback, gram (Gram Newton-Schulz twins of the Newton-Schulz candidates, on shapes "
            "where they save flops); default: all.",
        ),
    ] = None,
    ranks: Annotated[
        str | None,
        typer.Option("--ranks", help="Ranks for lowrank/rsvd/momentum_rank, e.g. 32,64 (default 16..256)."),
    ] = None,
    steps: Annotated[str | None, typer.Option("--steps", help="Newton-Schulz steps, e.g. 3,5 (default 1..8).")] = None,
    schedules: Annotated[
        str | None, typer.Option("--schedules", help="Coefficient schedules, e.g. jordan,polar_express.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="bf16, fp32 or both (given: timed even where emulated).")
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", callback=in_range(1), help="Sketch seeds per randomized candidate.")
    ] = 3,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    all_layers: Annotated[
        bool, typer.Option("--all-layers", help="Bench every matrix, not only the Muon-routed ones.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Bench file (default: SPECTRA-stem.bench.json).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw the Pareto fronts per role as a PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the bench result JSON on stdout.")] = False,
    capture_steps: Annotated[
        int, typer.Option("--capture-steps", callback=in_range(1), help="Training steps when capturing a MODEL first.")
    ] = CAPTURE_STEPS,
) -> None:
    """Time every orthogonalizer candidate on this device and measure its accuracy on each layer's spectrum."""
    from .._files import OutputPathError, check_writable
    from ..bench import BenchError, GridError, parse_grid, run_bench, save_bench
    from ..capture import SpectraError, load_spectra
    from ..device import DeviceError, resolve_device

    shown = err_console if as_json else console
    try:
        grid = parse_grid(methods=methods, ranks=ranks, steps=steps, schedules=schedules, dtypes=dtype)
        if seeds < 1:
            raise GridError(f"--seeds must be at least 1, got {seeds}")
        torch_device = resolve_device(device)
        is_file = Path(source).is_file()
        stem = _stem(source) if is_file else safe_name(source)
        folder = Path(source).parent if is_file else Path(".")
        out = out if out is not None else folder / f"{stem}.bench.json"
        check_writable(out)
        if plot is not None:
            check_writable(plot)
        if is_file:
            spectra = load_spectra(source)
            spectra_path = source
        else:
            spectra_path = str(folder / f"{stem}.spectra.pt")
            check_writable(spectra_path)
            spectra = _capture(source, torch_device, capture_steps, spectra_path, shown, as_json)
    except (GridError, DeviceError, OutputPathError, SpectraError) as err:
        fail(str(err), 2)

    progress = Progress(
        description_column(),
        BarColumn(),
        MofNCompleteColumn(),
        field_column("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=shown,
        transient=as_json,
    )
    tasks: dict[str, TaskID] = {}

    def on_progress(phase: str, detail: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=max(total, 1), detail="")
        progress.update(tasks[phase], completed=done, total=max(total, 1), detail=detail[:60])

    # Said before the work starts: a progress bar on a non-terminal shows nothing until the end.
    shown.print(f"bench: timing and scoring the candidates on {torch_device} for {spectra_path}")
    try:
        with progress:
            result = run_bench(
                spectra,
                device=torch_device,
                grid=grid,
                seeds=seeds,
                all_layers=all_layers,
                progress=on_progress,
                spectra_path=spectra_path,
                command=" ".join(["muonprof", *sys.argv[1:]]),
            )
    except (GridError, BenchError) as err:
        fail(f"{err} (no bench file written)", 2)
    except KeyboardInterrupt:
        fail("interrupted (no bench file written; run the same command again to redo it)", 130)

    save_bench(result, out)
    if plot is not None:
        from ..plots.pareto import plot_pareto

        plot_pareto(result, plot)
    if as_json:
        print(result.dumps())
        return
    _print_report(result)
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _capture(model: str, device: Any, steps: int, path: str, shown: Any, as_json: bool) -> Any:
    """The thin MODEL path: build the workload, capture its spectra (with matrices), save them."""
    from ..capture import DEFAULT_WARMUP_STEPS, CaptureError, capture_spectra, save_spectra
    from ..data import DataError
    from ..models import ModelSpecError
    from ..workload import WorkloadError, build_workload

    try:
        workload = build_workload(model, device=device)
        with Progress(
            TextColumn("capturing {task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=shown,
            transient=as_json,
        ) as progress:
            task = progress.add_task(model, total=DEFAULT_WARMUP_STEPS + steps)  # the burn-in counts
            spectra = capture_spectra(
                workload,
                steps=steps,
                every=steps,
                save_matrices=True,
                on_step=lambda _step, _loss: progress.advance(task),
            )
    except (ModelSpecError, DataError, WorkloadError) as err:
        fail(f"{model!r} is not a spectra file, and as a model: {err}", 2)
    except CaptureError as err:
        fail(f"{err} (no bench file written)")
    save_spectra(spectra, path)
    shown.print(f"captured {model}: wrote {path}")
    return spectra


def _print_report(result: Any) -> None:
    from ..optim.state_memory import format_bytes

    summary = result.summary
    baseline = summary["baseline"]
    sure = _certainty_by_role(result)
    for role, front in result.fronts["roles"].items():
        table = Table(title=f"{role}: Pareto-optimal candidates (time vs alignment; * state vs alignment)")
        columns = (
            "candidate", "time/step", "timing", "align (layer mean)", "align (worst)", "rel_err", "sv range", "state"
        )  # fmt: skip
        for col in columns:
            table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col == "candidate")
        rows = list(front)
        shown = {p["label"] for p in rows}
        # The candidates worth their optimizer state (low-rank momenta), marked *, and the default.
        memory = [p for p in result.fronts.get("roles_state", {}).get(role, []) if p["label"] not in shown]
        rows += memory
        if baseline not in shown | {p["label"] for p in memory}:
            rows += [p for p in result.fronts["role_points"].get(role, []) if p["label"] == baseline]
        starred = {p["label"] for p in memory}
        for p in sorted(rows, key=lambda p: p["time_s"]):
            name = p["label"] + (" (default)" if p["label"] == baseline else "")
            name += " *" if p["label"] in starred else ""
            table.add_row(
                name,
                _ms(p["time_s"]),
                sure.get(role, {}).get(p["label"], "-"),
                f"{p['alignment']:.4f}",
                f"{p['alignment_worst']:.4f}",
                f"{p['rel_err']:.3f}",
                f"{p['sv_min']:.2f}-{p['sv_max']:.2f}",
                format_bytes(p["state_bytes"]) if p.get("state_bytes") is not None else "-",
            )
        console.print(table)
    check = result.model_check
    if check.get("rows"):
        console.print(
            f"spectral model vs real bf16 Newton-Schulz ({len(check['layers'])} layers x {len(check['configs'])} "
            f"configs): max gap alignment {check['max_gap_alignment']:.2g}, rel_err {check['max_gap_rel_err']:.2g}"
        )
    for note in result.meta.get("notes", []):
        console.print(styled(("note:", "yellow"), f" {note}"))
    line, loaded = _timing_line(result)
    if line:
        console.print(styled(("note:", "yellow"), f" {line}") if loaded else line)
    if summary.get("speedup") is not None:
        short = f"; {len(summary['short_of_target'])} layers short of it" if summary["short_of_target"] else ""
        console.print(
            styled(
                f"per step: default {baseline} everywhere {_ms(summary['default_step_s'])} "
                f"(mean alignment {summary['default_alignment_mean']:.3f}) vs fastest reaching alignment "
                f">= {summary['target_alignment']} per layer {_ms(summary['tuned_step_s'])}: ",
                (f"{summary['speedup']:.2f}x", "bold"),
                short,
            )
        )
    else:
        console.print(f"per step: the default {baseline} was not timed on every layer (see the bench file)")
    if summary.get("default_state_bytes") is not None:
        tuned = summary.get("tuned_state_bytes")
        least = summary.get("min_state_bytes")
        benched = "momentum_rank" in result.meta.get("grid", {}).get("methods", [])
        console.print(
            f"Muon optimizer state (benched layers, fp32): default {format_bytes(summary['default_state_bytes'])}, "
            f"fastest reaching the target {format_bytes(tuned) if tuned is not None else '-'}, "
            f"least with these candidates {format_bytes(least) if least is not None else '-'}"
            + ("" if benched else " (no momentum_rank benched)")
        )
    console.print(f"bench took {result.meta['wall_s']:.1f} s")


def _certainty_by_role(result: Any) -> dict[str, dict[str, str]]:
    """role -> label -> the least sure grade of that candidate's timings over the role's shapes (with "re" when
    one was re-measured): a role's time/step sums its shapes, so it is only as sure as the worst of them."""
    from ..bench.cost import CERTAINTIES as GRADES

    shapes: dict[str, set[tuple[int, int]]] = {}
    for layer in result.layers:
        shapes.setdefault(layer["role"], set()).add(tuple(layer["matrix_shape"]))
    out: dict[str, dict[str, str]] = {}
    for role, wanted in shapes.items():
        worst: dict[str, int] = {}
        again: set[str] = set()
        for cost in result.costs:
            grade = cost.timing.certainty if cost.timing is not None and cost.shape in wanted else None
            if grade is None:
                continue
            worst[cost.label] = min(worst.get(cost.label, len(GRADES)), GRADES.index(grade))
            if cost.timing.remeasured:
                again.add(cost.label)
        out[role] = {label: GRADES[g] + (", re" if label in again else "") for label, g in worst.items()}
    return out


def _timing_line(result: Any) -> tuple[str | None, bool]:
    """One line on how sure the timings are and how busy the machine was; True when it was loaded."""
    from ..bench.cost import CERTAINTIES as GRADES

    graded = [c.timing for c in result.costs if c.timing is not None and c.timing.certainty is not None]
    load = result.meta.get("load") or {}
    if not graded:
        return None, False
    counts = {g: sum(t.certainty == g for t in graded) for g in reversed(GRADES)}
    again = sum(t.remeasured for t in graded)
    line = (
        "timing certainty (rounds, IQR/median): " + ", ".join(f"{n} {g}" for g, n in counts.items())
        + f"; {again} re-measured"
    )  # fmt: skip
    before, after, cpus = load.get("loadavg_before"), load.get("loadavg_after"), load.get("usable_cpus")
    loaded = False
    if before and after and cpus:
        loaded = max(before[0], after[0]) > cpus
        line += f"; load {before[0]:g} -> {after[0]:g} on {cpus} CPUs, {load.get('torch_threads')} torch threads"
        if load.get("steal_fraction"):
            line += f", {load['steal_fraction']:.0%} stolen"
        if loaded:
            line += ": the machine was busy, re-run bench on a quieter one to trust close calls"
    return line, loaded


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".spectra.pt", ".pt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem
