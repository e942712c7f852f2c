"""``muonprof tune``: from a model (or its spectra / bench files) to a per-layer profile, resumably."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..capture import DEFAULT_WARMUP_STEPS, DEFAULT_WINDOW
from ..stats import DEFAULT_MARGIN
from ._common import console, description_column, err_console, fail, in_range, print_json, safe_name


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)


def tune_command(
    source: Annotated[str, typer.Argument(help="MODEL (built-in, module:factory, hf:PATH) or a spectra file.")],
    bench_file: Annotated[Path | None, typer.Option("--bench", help="A bench file (default: run bench).")] = None,
    target_alignment: Annotated[
        float | None,
        typer.Option(
            "--target-alignment",
            callback=in_range(0, 1, lo_open=True),
            help="Fastest profile with this descent share (default: the default's).",
        ),
    ] = None,
    time_budget_ms: Annotated[
        float | None,
        typer.Option(
            "--time-budget-ms",
            callback=in_range(0, lo_open=True),
            help="Best profile within this orthogonalization time.",
        ),
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
    trials: Annotated[
        int, typer.Option("--trials", callback=in_range(1), help="Stage-1 Optuna trials (cheap: no training).")
    ] = 300,
    lr_trials: Annotated[
        int, typer.Option("--lr-trials", callback=in_range(0), help="Stage-2 training trials (0 skips stage 2).")
    ] = 12,
    lr_steps: Annotated[
        int, typer.Option("--lr-steps", callback=in_range(1), help="Training steps per stage-2 trial.")
    ] = 60,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", callback=in_range(1), help="Stage-2 pruning interval.")
    ] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median or hyperband.")] = "median",
    floor: Annotated[
        float, typer.Option("--min-layer-alignment", callback=in_range(0, 1), help="No layer below this.")
    ] = 0.5,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage", callback=_check_storage, help="Optuna storage URL or journal:PATH (default: SQLite by --out)."
        ),
    ] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Resume or share this study.")] = None,
    seed: Annotated[
        int, typer.Option("--seed", callback=in_range(0, 2**63 - 1), help="Seeds samplers, init and batches.")
    ] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Profile to write (default MODEL.profile.json).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the stage-1 Pareto front.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    capture_steps: Annotated[
        int, typer.Option("--capture-steps", callback=in_range(1), help="Training steps captured after the burn-in.")
    ] = 20,
    warmup_steps: Annotated[
        int,
        typer.Option(
            "--warmup-steps",
            callback=in_range(0),
            help="Burn-in steps before the first capture (early spectra are low-rank).",
        ),
    ] = DEFAULT_WARMUP_STEPS,
    captures: Annotated[
        int,
        typer.Option(
            "--captures",
            callback=in_range(1),
            help="Spectra snapshots spread over --capture-steps (scored on the worst).",
        ),
    ] = 3,
    window: Annotated[
        int,
        typer.Option(
            "--window", callback=in_range(0), help="Consecutive gradients kept for the multi-step accuracy (0: none)."
        ),
    ] = DEFAULT_WINDOW,
    batch_size: Annotated[
        int, typer.Option("--batch-size", callback=in_range(1), help="Batch size for capture and stage 2.")
    ] = 8,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", callback=in_range(1), help="Sequence length (language models).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Training data (see `muonprof spectrum`).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model override key=value.")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Bench grid: methods (when benching).")] = None,
    ranks: Annotated[str | None, typer.Option("--ranks", help="Bench grid: ranks (when benching).")] = None,
    ns_steps: Annotated[
        str | None, typer.Option("--ns-steps", help="Bench grid: Newton-Schulz steps, e.g. 3,5 (bench's --steps).")
    ] = None,
    schedules: Annotated[
        str | None, typer.Option("--schedules", help="Bench grid: coefficient schedules, e.g. jordan,polar_express.")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Bench grid: bf16, fp32 or both.")] = None,
    bench_seeds: Annotated[
        int, typer.Option("--bench-seeds", callback=in_range(1), help="Bench: sketch seeds per randomized candidate.")
    ] = 3,
    race_candidates: Annotated[
        int,
        typer.Option(
            "--race-candidates", callback=in_range(0), help="Stage-1 profiles raced against the default (0: no race)."
        ),
    ] = 3,
    race_seeds: Annotated[
        int, typer.Option("--race-seeds", callback=in_range(1), help="Paired seeds per race contender.")
    ] = 3,
    race_steps: Annotated[
        int, typer.Option("--race-steps", callback=in_range(1), help="Race horizon: training steps of the last rung.")
    ] = 200,
    confirm_steps: Annotated[
        int | None,
        typer.Option(
            "--confirm-steps",
            callback=in_range(0),
            help="Before a race passer ships it must also be non-inferior after this many steps (same seeds; "
            "default: twice --race-steps; 0: no confirmation).",
        ),
    ] = None,
    same_math: Annotated[
        bool,
        typer.Option(
            "--same-math/--no-same-math",
            help="Also race the default's own polynomial at each layer's fastest dtype or Gram form (changes "
            "only rounding).",
        ),
    ] = True,
    confirm_seeds: Annotated[
        int | None,
        typer.Option(
            "--confirm-seeds",
            callback=in_range(0),
            help="An inconclusive confirmation is judged again over this many seeds, each look at the 97.5% "
            "bound (default: twice --race-seeds; 0: no extension).",
        ),
    ] = None,
    race_rungs: Annotated[
        int, typer.Option("--race-rungs", callback=in_range(1), help="Successive-halving rungs (horizon halves).")
    ] = 2,
    race_eval_every: Annotated[
        int | None,
        typer.Option(
            "--race-eval-every", callback=in_range(1), help="Race evaluation interval (default: shortest rung / 4)."
        ),
    ] = None,
    max_loss_increase: Annotated[
        float,
        typer.Option(
            "--max-loss-increase",
            callback=in_range(0),
            help="Race margin δ (nats): a candidate passes when the 95% upper bound of its mean paired "
            "val-loss difference to the default is below it.",
        ),
    ] = DEFAULT_MARGIN,
    min_speedup: Annotated[
        float,
        typer.Option(
            "--min-speedup",
            callback=in_range(0, lo_open=True),
            help="A passer ships only if its measured optimizer step is this much faster.",
        ),
    ] = 1.05,
    match_update_size: Annotated[
        bool,
        typer.Option(
            "--match-update-size/--shared-lr",
            help="Scale each candidate layer's lr so its predicted ||O||_F equals the default recipe's.",
        ),
    ] = True,
    ladders: Annotated[
        bool,
        typer.Option(
            "--ladders/--no-ladders",
            help="Write adaptive ladders (per layer, cheap -> exact recipes from its stage-1 front, moved in "
            "training by quality signals) around the shipped recipes. Off by default: validate proves them.",
        ),
    ] = False,
) -> None:
    """Pick per-layer orthogonalizers (stage 1), the default recipe's LR scaling (stage 2), race the candidates
    against the default in real training (stage 3), and write the winner's profile (or the default's)."""
    from .._files import OutputPathError, check_writable
    from ..bench import BenchError, GridError
    from ..capture import CaptureError, SpectraError
    from ..data import DataError
    from ..device import DeviceError, resolve_device
    from ..models import ModelSpecError, parse_overrides
    from ..tune import TuneError
    from ..tune.pipeline import TuneRequest, run_tune
    from ..tune.race import RaceOptions
    from ..workload import WorkloadError

    state_budget = None
    if state_memory_budget is not None:
        from ..optim.state_memory import parse_bytes

        try:
            state_budget = parse_bytes(state_memory_budget)
        except ValueError as err:
            fail(f"--state-memory-budget: {err}", 2)
    shown = err_console if as_json else console
    try:
        request = TuneRequest(
            source=source,
            out=out,
            bench_file=bench_file,
            target_alignment=target_alignment,
            time_budget_s=time_budget_ms / 1e3 if time_budget_ms is not None else None,
            state_budget=state_budget,
            trials=trials,
            lr_trials=lr_trials,
            lr_steps=lr_steps,
            eval_every=eval_every,
            pruner=pruner,
            floor=floor,
            storage=storage,
            study_name=study_name,
            seed=seed,
            capture_steps=capture_steps,
            warmup_steps=warmup_steps,
            captures=captures,
            window=window,
            batch_size=batch_size,
            seq_len=seq_len,
            data=data,
            device=resolve_device(device),
            overrides=parse_overrides(set_ or []),
            methods=methods,
            ranks=ranks,
            ns_steps=ns_steps,
            schedules=schedules,
            dtypes=dtype,
            bench_seeds=bench_seeds,
            race=RaceOptions(
                candidates=race_candidates,
                seeds=race_seeds,
                steps=race_steps,
                rungs=race_rungs,
                eval_every=race_eval_every,
                margin=max_loss_increase,
                min_speedup=min_speedup,
                match_update_size=match_update_size,
                confirm_steps=2 * race_steps if confirm_steps is None else confirm_steps,
                confirm_seeds=2 * race_seeds if confirm_seeds is None else confirm_seeds,
                same_math=same_math,
            ),
            ladders=ladders,
            command=" ".join(["muonprof", *sys.argv[1:]]),
        )
        request.check()
        target = out if out is not None else Path(f"{safe_name(source)}.profile.json")
        if not Path(source).is_file():
            check_writable(target)
        if plot is not None:
            check_writable(plot)
    except (ModelSpecError, DeviceError, OutputPathError, TuneError) as err:
        fail(str(err), 2)

    import torch

    try:
        with _quiet_interrupts():
            outcome = run_tune(request, _Reporter(shown, as_json))
    except KeyboardInterrupt:
        fail(
            "interrupted: finished trials and race runs are stored in the Optuna storage; run the same command "
            "again to continue. No profile written.",
            130,
        )
    except (ModelSpecError, DataError, WorkloadError, DeviceError, OutputPathError, SpectraError) as err:
        fail(str(err), 2)
    except (BenchError, GridError, TuneError) as err:
        fail(str(err), 2)
    except CaptureError as err:
        fail(str(err), 1)
    except torch.OutOfMemoryError:
        fail(f"out of memory on {device}; try a smaller --batch-size or --seq-len. No profile written.")
    s1, s2, race = outcome.stage1, outcome.stage2, outcome.race
    if plot is not None:
        from ..plots.tune import plot_front

        plot_front(s1, plot)
    shipped = outcome.profile.provenance.model_dump() if outcome.profile.provenance else {}
    expected = shipped.get("expected") or {}
    ortho_ms = float(expected.get("ortho_time_ms") or 0.0)
    speedup = s1.baseline.time_s * 1e3 / ortho_ms if ortho_ms > 0 else float("inf")
    result = {
        "profile": str(outcome.out),
        "storage": outcome.storage,
        "study": outcome.study,
        "shipped": outcome.shipped,
        "choice": outcome.assignment.to_json(),
        "baseline": s1.baseline.to_json(),
        "stage1_choice": s1.choice.to_json(),
        "speedup": speedup,
        "front": [a.to_json() | {"picks": None} for a in s1.front],
        "stage1_trials_run": s1.trials_run,
        "lr": outcome.lr.to_json(),
        "lr_val_loss": s2.best_value if s2 else None,
        "lr_default_val_loss": s2.default_value if s2 else None,
        "race": race.to_json() if race else None,
        "state_memory": outcome.state,
        "artifacts": outcome.artifacts,
        "notes": outcome.notes,
    }
    if as_json:
        print_json(result)
        return
    console.print(_front_table(s1))
    choice = s1.choice
    console.print(
        f"stage 1 pick ({choice.source}): {choice.time_s * 1e3:.3g} ms per step vs default "
        f"{s1.baseline.time_s * 1e3:.3g} ms ({s1.baseline.time_s / choice.time_s:.2f}x predicted), descent share "
        f"{choice.quality:.4f} vs {s1.baseline.quality:.4f}, worst layer {choice.worst:.3f}",
        highlight=False,
    )
    if s2 is not None:
        default = f"{s2.default_value:.4f}" if s2.default_value is not None else "n/a"
        console.print(
            f"learning rate (default recipe): rule {s2.choice.lr_rule}, base lr {s2.choice.base_lr:.4g}; val loss "
            f"{s2.best_value:.4f} (untuned {default}); {s2.finished} trials, {s2.pruned} pruned",
            highlight=False,
        )
    if race is not None:
        console.print(race_table(race.to_json()))
    console.print(_state_line(outcome.state), highlight=False)
    for note in outcome.notes:
        console.print(Text("note: ", style="yellow") + Text(note))
    console.print(
        Text(
            f"shipped: {outcome.shipped}; wrote {outcome.out}"
            + (f" and {plot}" if plot else "")
            + f"; study {outcome.study} in {outcome.storage}"
        )
    )


class _DropInterrupts(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C as a failed trial, with the KeyboardInterrupt's whole traceback
    (~45 lines) before it re-raises; the command then prints its own one line, so that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, KeyboardInterrupt) and "KeyboardInterrupt" not in record.getMessage()


@contextlib.contextmanager
def _quiet_interrupts() -> Iterator[None]:
    """Drop Optuna's KeyboardInterrupt log records (only those) while the pipeline runs."""
    import optuna

    optuna.logging.get_logger("optuna")  # configures Optuna's own handler now, so the filter reaches it
    logger = logging.getLogger("optuna")
    drop = _DropInterrupts()
    loggers = [
        logger,
        *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("optuna.")),
    ]
    for each in loggers:
        each.addFilter(drop)
        for handler in each.handlers:
            handler.addFilter(drop)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(drop)
            for handler in each.handlers:
                handler.removeFilter(drop)


def _check_storage(value: str | None) -> str | None:
    """``--storage journal:PATH``: the folder of PATH must exist (Optuna would create it, even at the root)."""
    if value is None:
        return value
    if value.startswith("journal:") or ("://" not in value and value.endswith((".log", ".journal", ".jsonl"))):
        parent = Path(value.removeprefix("journal:")).expanduser().parent
        if not parent.is_dir():
            fail(f"--storage {value}: folder {parent} does not exist (create it first)", 2)
    return value


class _Reporter:
    """The pipeline's stage lines and progress bars on the console (bars vanish under --json)."""

    def __init__(self, shown: Any, transient: bool) -> None:
        self.shown, self.transient = shown, transient

    def stage(self, text: str) -> None:
        head, _, rest = text.partition(": ")
        self.shown.print(Text(head, style="bold") + Text(": " + rest if rest else ""))

    @contextlib.contextmanager
    def track(self, label: str, total: int) -> Iterator[Callable[..., None]]:
        with _progress(self.shown, self.transient) as progress:
            task = progress.add_task(label, total=max(total, 1))

            def update(completed: int, total: int | None = None) -> None:
                progress.update(task, completed=completed, **({"total": max(total, 1)} if total else {}))

            yield update


def race_table(race: dict[str, Any]) -> Table:
    """The stage-3 table from a race's JSON (``RaceResult.to_json()``, as the profile records it); the
    contenders' recipes are in its caption."""
    opts = race["options"]
    table = Table(
        title=f"stage 3 race: {opts['seeds']} paired seeds, δ {opts['margin']:g} nats, Δ = contender − default",
        caption="\n".join(f"{row['name']}: {_methods(row['methods'])}" for row in race["table"]),
        caption_justify="left",
    )
    horizon = max(opts.get("horizons") or [opts["steps"]])
    confirm = opts.get("confirm_steps")
    judged = [f"Δ@{horizon}", *([f"Δ@{confirm}"] if confirm else [])]
    for col in ("", "", "pred", "meas", *judged, "verdict", "hit"):
        table.add_column(col, justify="left" if col in ("", "verdict") else "right")
    for row in race["table"]:
        default = row["name"] == "default"
        measured = "-"
        if row.get("measured_step_ms"):
            measured = f"{row['measured_step_ms']:.3g} ms" if default else f"{row.get('measured_speedup') or 0:.2f}x"
        reached = [s for s in row.get("steps_to_target") or [] if s is not None]
        deltas = [_delta_cell(row.get("paired_delta"), row.get("bound"))]
        if confirm:
            cell = _delta_cell(row.get("confirm_delta"), row.get("confirm_bound"))
            n = row.get("confirm_seeds")
            deltas.append(cell + (f"\n{n} seeds" if n and n != opts["seeds"] else ""))
        table.add_row(
            "→" if row["name"] == race["winner"] else "",
            row["name"],
            "-" if default else f"{row['predicted_speedup']:.2f}x",
            measured,
            *deltas,
            _short_verdict(row),
            "-" if default else f"{len(reached)}/{len(row.get('steps_to_target') or [])}",
        )
    return table


def _delta_cell(delta: float | None, bound: float | None) -> str:
    """The paired mean Δ over its one-sided 95% upper bound (two short lines: the table fits 80 columns)."""
    if delta is None:
        return "-"
    return f"{delta:+.4f}" + ("" if bound is None else f"\n≤{bound:+.4f}")


def _short_verdict(row: dict[str, Any]) -> str:
    verdict = str(row["verdict"])
    if verdict.startswith("eliminated"):
        return f"out at {row.get('eliminated_at') or row.get('horizon')}{verdict.removeprefix('eliminated')}"
    if verdict.startswith("not confirmed at"):
        return "unconfirmed" + verdict[verdict.index(" (") :]
    return verdict


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _methods(methods: dict[str, int]) -> str:
    return ", ".join(f"{n}x {label}" for label, n in methods.items())


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
            mark,
            f"{a.time_s * 1e3:.4g}",
            f"{base / a.time_s:.2f}x" if a.time_s else "-",
            f"{a.quality:.4f}",
            f"{a.worst:.3f}",
            *state,
            a.source,
        )
    return table


def _finished(study: Any) -> int:
    from ..tune.study import finished_trials

    return len(finished_trials(study, searched_only=True))


def _progress(shown: Any, transient: bool) -> Progress:
    return Progress(
        description_column(),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=shown,
        transient=transient,
    )
