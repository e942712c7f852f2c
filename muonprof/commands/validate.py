"""``muonprof validate``: train for real and show whether a profile beats the defaults, torch's Muon and AdamW."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..stats import DEFAULT_MARGIN
from ._common import console, err_console, fail, in_range, print_json, safe_name, styled, training_progress

SET_HELP = "Override a model setting, e.g. --set width=512 --set depth=4 (repeatable)."


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)


def validate_command(
    model: Annotated[
        str | None,
        typer.Argument(help="Built-in name (see `muonprof models`), module:factory or hf:PATH (omit with --from)."),
    ] = None,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="The profile to validate (omit to race only --against).")
    ] = None,
    against: Annotated[
        str,
        typer.Option(
            "--against",
            help=(
                "Contenders to race it against: default, torch, adamw, default-lr, static (an adaptive profile "
                "without its ladders) (comma-separated)."
            ),
        ),
    ] = "default,torch,adamw",
    steps: Annotated[
        int, typer.Option("--steps", callback=in_range(1), help="Training steps per run (the equal-steps comparison).")
    ] = 200,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            callback=in_range(0, lo_open=True),
            help="Also stop a run after this many seconds of training.",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option("--eval-every", callback=in_range(1), help="Validation loss every K steps (default: steps/20)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Text file/folder, 'stdlib' (default), 'random'; images: synthetic, digits."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", callback=in_range(0, 2**63 - 1), help="First seed (init and batches).")
    ] = 0,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", callback=in_range(1), help="Seeds per contender (paired; >= 2 gives a verdict, 3+ recommended)."
        ),
    ] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", callback=in_range(1), help="Sequences (or images) per batch.")
    ] = 8,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", callback=in_range(1), help="Tokens per sequence (language models).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", callback=in_range(0, lo_open=True), help="Muon lr of profile/default/torch (default 0.02)."
        ),
    ] = None,
    adamw_lr: Annotated[
        float | None,
        typer.Option(
            "--adamw-lr",
            callback=in_range(0, lo_open=True),
            help="lr of their AdamW group (embeddings, head, gains; 3e-4).",
        ),
    ] = None,
    baseline_lr: Annotated[
        float | None,
        typer.Option(
            "--baseline-lr",
            callback=in_range(0, lo_open=True),
            help="lr of the all-AdamW contender (default by size: 3e-3/1e-3/6e-4).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Results JSON (default: MODEL.validate.json).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG of the loss curves here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="The contender the others are judged against (default: default, else first)."),
    ] = None,
    max_loss_increase: Annotated[
        float | None,
        typer.Option(
            "--max-loss-increase",
            callback=in_range(0),
            help=f"Margin δ (nats): non-inferior if the paired 95% bound of Δ val loss is below it [{DEFAULT_MARGIN}].",
        ),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from", help="Re-read a results file and re-judge it (no training; writes only with --out)."),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            callback=in_range(1),
            help="Train data-parallel over N local processes (torchrun-style; gloo on CPU, one GPU per rank "
            "with nccl); --batch-size is the global batch, split over the ranks.",
        ),
    ] = 1,
) -> None:
    """Race a profile against ProfiledMuon's defaults, torch.optim.Muon and AdamW on real training."""
    import torch

    from .._files import OutputPathError, check_writable
    from ..data import DataError
    from ..device import DeviceError, resolve_device
    from ..launch import LaunchError
    from ..models import ModelSpecError, parse_overrides
    from ..profile import ProfileError
    from ..validate import ContenderError, ProgressEvent, ValidationError, parse_contenders, save_results, validate
    from ..validate.distributed import check_distributed, validate_distributed
    from ..validate.run import check_judging
    from ..workload import WorkloadError

    margin = DEFAULT_MARGIN if max_loss_increase is None else max_loss_increase
    if from_file is not None:
        if model is not None:
            fail(f"give MODEL or --from FILE, not both (got {model!r} and --from {from_file})", 2)
        _rejudge(from_file, reference, max_loss_increase, out, plot, as_json)
        return
    if model is None:
        fail("missing MODEL (a built-in name, module:factory or hf:PATH), or --from FILE to re-read results", 2)
    out = out if out is not None else Path(f"{safe_name(model)}.validate.json")
    shown = console if not as_json else err_console
    try:
        check_judging(parse_contenders(against, with_profile=profile is not None), reference, margin)
        check_writable(out)
        if plot is not None:
            check_writable(plot)
        torch_device = resolve_device(device)
        overrides = parse_overrides(set_ or [])
        if nproc != 1:
            check_distributed(nproc, batch_size, torch_device)
    except (ModelSpecError, DeviceError, OutputPathError, ValidationError, ContenderError) as err:
        fail(_one_line(err), 2)

    from ..validate.checkpoint import RunStore, partial_path

    store = RunStore.open(partial_path(out), _run_inputs(
        model, profile, against, steps, time_budget, eval_every, data, batch_size, seq_len, overrides, torch_device,
        lr, adamw_lr, baseline_lr, nproc,
    ))  # fmt: skip
    if store.runs:
        shown.print(f"resuming: {len(store.runs)} finished runs from {store.path} (the same command was interrupted)")
    elif store.ignored is not None:
        shown.print(styled(("note:", "yellow"), f" not resuming from {store.path}: {store.ignored}"))
    progress = training_progress(shown, as_json)
    tasks: dict[tuple[str, int], Any] = {}
    multi_seed = seeds > 1

    def report(event: ProgressEvent) -> None:
        key = (event.contender, event.seed)
        label = event.contender + (f" seed {event.seed}" if multi_seed else "")
        if event.kind == "skipped":
            shown.print(styled(("skipping", "yellow"), f" {event.contender}: {event.message}"))
        elif event.kind == "start":
            tasks[key] = progress.add_task(label, total=event.total, loss="-")
        elif event.kind == "stored":
            tasks[key] = progress.add_task(label, total=event.total, completed=event.step, loss="stored")
        elif event.kind == "step":
            progress.update(tasks[key], completed=event.step, loss=f"{event.loss:.4f}")
        elif event.kind == "done" and event.result is not None:
            r = event.result
            note = f"diverged at {r.diverged_at}" if r.diverged_at is not None else f"val {r.final_val_loss or 0:.4f}"
            progress.update(tasks[key], completed=event.total if r.stop_reason == "steps" else r.steps_done, loss=note)
            store.add(event.contender, event.seed, r)  # kept before the next run starts: a Ctrl-C loses no run

    run = validate if nproc == 1 else partial(validate_distributed, nproc=nproc)
    try:
        with progress:
            result = run(
                model,
                profile=profile,
                contenders=against,
                steps=steps,
                time_budget_s=time_budget,
                seeds=seeds,
                seed=seed,
                eval_every=eval_every,
                data=data,
                batch_size=batch_size,
                seq_len=seq_len,
                device=torch_device,
                overrides=overrides,
                lr=lr,
                adamw_lr=adamw_lr,
                baseline_lr=baseline_lr,
                progress=report,
                command=" ".join(["muonprof", *sys.argv[1:]]),
                reference=reference,
                margin=margin,
                resume=store.runs,
            )
    except (ProfileError, ContenderError, ValidationError, ModelSpecError, DataError, WorkloadError) as err:
        fail(_one_line(err) + " (no results file written)", 2)
    except (ValueError, TypeError) as err:  # e.g. an lr ProfiledMuon refuses
        fail(_one_line(err) + " (no results file written)", 2)
    except LaunchError as err:  # a worker of --nproc N failed: its one line (the others were stopped)
        fail(err.message, err.code)
    except torch.OutOfMemoryError:
        fail(f"out of memory on {torch_device}: try a smaller --batch-size or --seq-len (no results file written)")
    except KeyboardInterrupt:
        if store.runs:
            fail(
                f"interrupted: {len(store.runs)} finished runs are kept in {store.path}; run the same command again "
                "to continue (no results file written)",
                130,
            )
        fail("interrupted (no results file written)", 130)

    save_results(result, out)
    store.remove()
    _show(result, out, plot, as_json)
    if as_json:
        return
    load = result.meta.get("cpu_load_before")
    cores = os.cpu_count() or 1
    if torch_device.type == "cpu" and load and load[0] > 0.5:
        console.print(
            styled(
                ("note:", "yellow"),
                f" CPU load average was {load[0]:.1f} on {cores} cores before the runs: other work "
                "shares this machine, so the timings (and the equal wall-clock column) are noisy",
            )
        )
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _run_inputs(
    model: str,
    profile: Path | None,
    against: str,
    steps: int,
    time_budget: float | None,
    eval_every: int | None,
    data: str | None,
    batch_size: int,
    seq_len: int | None,
    overrides: dict[str, Any],
    device: Any,
    lr: float | None,
    adamw_lr: float | None,
    baseline_lr: float | None,
    nproc: int,
) -> dict[str, Any]:
    """Everything a run's numbers depend on (the key of the finished runs a re-run may reuse); the profile by
    its bytes, so an edited profile is trained again. Not the seeds: each run is stored under its own."""
    import hashlib

    import torch

    from .._version import __version__

    try:
        profile_digest = hashlib.sha256(profile.read_bytes()).hexdigest() if profile is not None else None
    except OSError:
        profile_digest = "unreadable"  # validate refuses it in one line before any run
    return {
        "model": model, "profile": profile_digest, "against": against, "steps": steps, "time_budget": time_budget,
        "eval_every": eval_every, "data": data, "batch_size": batch_size, "seq_len": seq_len,
        "overrides": overrides, "device": str(device), "lr": lr, "adamw_lr": adamw_lr, "baseline_lr": baseline_lr,
        "nproc": nproc, "versions": [__version__, torch.__version__],
    }  # fmt: skip


def _rejudge(
    path: Path, reference: str | None, margin: float | None, out: Path | None, plot: Path | None, as_json: bool
) -> None:
    """``validate --from FILE``: load a results file (any muonprof.validate/1, old summaries included),
    re-summarize it by the current rule with ``--reference`` / ``--max-loss-increase`` if given (else the
    file's own, else the defaults), show it, and write it (and the plot) only where asked."""
    from .._files import OutputPathError, check_writable
    from ..validate import ResultsFormatError, load_results, save_results

    try:
        for target in (out, plot):
            if target is not None:
                check_writable(target)
        result = load_results(path)
        if reference is not None or margin is not None:
            result.summarize(reference=reference, margin=margin)
    except (ResultsFormatError, OutputPathError) as err:
        fail(_one_line(err), 2)
    except ValueError as err:  # a --reference not in the file, a bad --max-loss-increase
        fail(_one_line(err) + " (nothing written)", 2)
    if out is not None:
        save_results(result, out)
    _show(result, out, plot, as_json)
    if not as_json and out is not None:
        console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _show(result: Any, out: Path | None, plot: Path | None, as_json: bool) -> None:
    """The plot (if asked), then the JSON document or the tables and verdict lines."""
    if plot is not None:
        from ..plots.curves import plot_curves

        plot_curves(result, plot)
    if as_json:
        document = result.to_dict(curves=False)
        document["files"] = {"results": str(out) if out else None, "plot": str(plot) if plot else None}
        print_json(document)
        return
    console.print(_table(result))
    console.print(_details_table(result))
    from ..validate import verdict_line

    summary = result.summary
    for verdict in summary["verdicts"].values():
        console.print(verdict_line(verdict), highlight=False)
    if len(result.seeds) == 1 and len(summary["verdicts"]["final_val_loss"]["pairs"]) > 0:
        console.print(
            styled(
                ("one seed:", "yellow"),
                " numbers only; no verdict is possible with one seed (run --seeds 3 for a paired bound and verdict)",
            )
        )
    for name, row in summary["rows"].items():
        per_step = row.get("grad_evals_per_step")
        if per_step is not None and per_step > 1.0 + 1e-9:
            console.print(
                styled(
                    ("note:", "yellow"),
                    f" {name} made {per_step:.2f} gradient evaluations per step "
                    f"({row['total_grad_evals']:g} in all): equal steps is not equal compute for it; the results "
                    "file has grad_evals per step to compare the curves per gradient evaluation",
                )
            )
    distributed = result.meta.get("distributed") or {}
    if distributed.get("world_size", 1) > 1:
        share = distributed.get("per_rank_batch_size")
        total = distributed.get("global_batch_size")
        rows = "an equal share of each batch" if share is None else f"{share} of the {total} rows"
        console.print(
            f"data parallel over {distributed['world_size']} ranks ({distributed['backend']}), {rows} per rank; "
            "times are rank 0's"
        )


def _table(result: Any) -> Table:
    """The verdict table: per contender its final val loss, the paired Δ against the reference with its bound
    and verdict, steps- and time-to-target, and its optimizer-step time against the reference's."""
    summary = result.summary
    rows, ref = summary["rows"], summary.get("reference")
    pairs = summary["verdicts"]["final_val_loss"]["pairs"]
    to_target = summary["to_target"]["contenders"]
    seeds = len(result.seeds)
    margin = summary["margin"]
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        title=f"{result.meta['model']['spec']}: {result.meta['steps']} steps"
        + (f", {seeds} paired seeds" if seeds > 1 else ", 1 seed")
        + (f", reference {ref}" if ref else ""),
        caption=(
            f"val loss at the last step{' (mean ± std)' if seeds > 1 else ''}; Δ: val loss - {ref}'s at equal "
            "steps, paired per seed, mean"
            + (" over seeds and its one-sided 95% upper bound" if seeds > 1 else "")
            + f"; verdict at δ = {margin:g} nats; target: {ref}'s final val loss per seed, the step of the "
            f"first eval reaching it (median) and {ref}'s time / the contender's (geometric mean"
            + (", min–max" if seeds > 1 else "")
            + "), never: not reached; opt: median ms per optimizer.step()"
        ),
    )
    table.add_column("contender", no_wrap=True)
    # Narrow enough for an 80-column terminal: two-number cells go on two lines; status is in the next table.
    table.add_column("val\nloss", justify="right")
    table.add_column(f"Δ vs\n{ref}" if ref else "Δ", justify="right")
    table.add_column("verdict", no_wrap=True)
    table.add_column("steps to\ntarget", justify="right")
    table.add_column("time to\ntarget", justify="right")
    table.add_column("opt\nms", justify="right")
    table.add_column("opt\n× ref", justify="right")
    for name, row in rows.items():
        if row.get("skipped"):
            table.add_row(name, "", "", "skipped", "", "", "", "")
            continue
        steps_text, speed_text = _to_target_text(to_target.get(name))
        ratio = row.get("optimizer_step_ratio")
        table.add_row(
            name,
            _spread(row.get("final_val_loss")),
            "-" if name == ref else _delta(pairs.get(name)),
            "reference" if name == ref else _verdict_text(pairs.get(name), row["status"]),
            steps_text,
            speed_text,
            _ms(row.get("median_optimizer_step_s")),
            "-" if ratio is None else f"{_ratio(ratio)}×",
        )
    return table


def _details_table(result: Any) -> Table:
    """The rest of the numbers: train loss, equal wall-clock (value, paired Δ), step time and memory."""
    summary = result.summary
    rows, ref = summary["rows"], summary.get("reference")
    pairs = summary["verdicts"]["equal_wall_val_loss"]["pairs"]
    per_seed = summary["equal_wall"]
    Ts = [v["T_s"] for v in per_seed.values() if v["T_s"] is not None]
    T_text = f"T={Ts[0]:.1f}s" if len(Ts) == 1 else "T"
    T_note = "" if len(Ts) <= 1 else f" (T per seed: {', '.join(f'{t:.1f}s' for t in Ts)})"
    kind = next((r.get("peak_memory_kind") for r in rows.values() if r.get("peak_memory_kind")), "")
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        caption=(
            "train loss: mean of the last 10% of steps; val @ T: val loss at the latest eval within T, the "
            f"fastest run's training time (equal wall-clock){T_note}, and its paired Δ vs {ref}; "
            "step: median ms per training step; "
            f"peak mem: {_memory_caption(kind)}; opt state: optimizer state tensors"
        ),
    )
    table.add_column("contender", no_wrap=True)
    for col in ("train loss", f"val @ {T_text}", "Δ @ T"):
        table.add_column(col, justify="right", min_width=7)
    for col in ("step ms", "peak mem", "opt state"):
        table.add_column(col, justify="right", min_width=5)
    table.add_column("status", overflow="fold", min_width=6)
    for name, row in rows.items():
        if row.get("skipped"):
            table.add_row(name, "", "", "", "", "", "", styled((f"skipped: {row['skipped']}", "yellow")))
            continue
        status = row["status"]
        table.add_row(
            name,
            _spread(row.get("final_train_loss")),
            _spread(row.get("equal_wall_val_loss")),
            "-" if name == ref else _delta(pairs.get(name)),
            _ms(row.get("median_step_s")),
            _bytes(row.get("peak_memory_bytes")),
            _bytes(row.get("state_bytes")),
            styled((status, "green" if status == "ok" else "red")),
        )
    return table


def _delta(pair: dict[str, Any] | None) -> str:
    """``+0.0031 [+0.0072]``: mean paired difference and its one-sided upper bound (none with one seed)."""
    if pair is None or pair.get("mean_diff") is None:
        return "-"
    if pair.get("upper_bound") is None:
        return f"{pair['mean_diff']:+.4f}"
    return f"{pair['mean_diff']:+.4f}\n[{pair['upper_bound']:+.4f}]"


def _verdict_text(pair: dict[str, Any] | None, status: str = "ok") -> Text:
    if pair is None or pair.get("verdict") is None:
        return Text("-") if status == "ok" else styled((status, "red"))
    colour = {"better": "green", "non-inferior": "green", "worse": "red", "diverged": "red"}.get(pair["verdict"])
    return styled((pair["verdict"], colour)) if colour else Text(pair["verdict"])


def _to_target_text(entry: dict[str, Any] | None) -> tuple[str, str]:
    """(steps to target, time-to-target speedup) cells: medians / geometric mean, with k/n when some seeds
    missed the target."""
    if entry is None:
        return "-", "-"
    reached, n = entry["reached"], entry["n"]
    if reached == 0:
        return "never", "-"
    missed = f"\n({reached}/{n})" if reached < n else ""
    steps = f"{entry['steps_median']:g}{missed}"
    speed = entry.get("speedup")
    if speed is None:
        return steps, "-"
    text = f"{_ratio(speed['geomean'])}×"
    if speed["n"] > 1:
        text += f"\n{_ratio(speed['min'])}–{_ratio(speed['max'])}"
    return steps, text


def _ratio(value: float) -> str:
    """Three significant digits, but always two decimals below 10 (``1.00``, ``12.8``, ``128``)."""
    return f"{value:.2f}" if value < 9.995 else f"{value:.3g}"


def _memory_caption(kind: str) -> str:
    return {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated",
        "process_peak_rss_this_run": "the whole process's peak RSS during the run",
        "process_peak_rss_since_start": "the process's peak RSS since it started (a high-water mark)",
    }.get(kind, "not measured")


def _spread(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    if s.get("std") is None:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ±{s['std']:.4f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
