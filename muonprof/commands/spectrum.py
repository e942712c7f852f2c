"""``muonprof models`` and ``muonprof spectrum``: name a model, train it for real, look at its spectra."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ..capture.run import DEFAULT_WARMUP_STEPS as DEFAULT_WARMUP
from ..capture.window import DEFAULT_WINDOW as DEFAULT_T
from ..capture.window import WINDOW_BYTES
from ._common import console, err_console, fail, in_range, print_json, safe_name, styled, training_progress

SET_HELP = "Override a model setting, e.g. --set width=512 --set depth=4 (repeatable)."


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
    app.command("spectrum")(spectrum_command)


def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list on stdout.")] = False,
) -> None:
    """List the built-in models with their parameter counts (any command also takes module:factory or hf:PATH)."""
    from ..models import catalog

    entries = catalog()
    if as_json:
        print_json(entries)
        return
    table = Table(title="built-in models (MODEL argument of every command)")
    for col in ("name", "parameters", "Muon matrices", "description"):
        table.add_column(col, justify="right" if col in ("parameters", "Muon matrices") else "left")
    for e in entries:
        table.add_row(e["name"], f"{e['parameters'] / 1e6:,.2f}M", str(e["muon_matrices"]), e["description"])
    console.print(table)
    console.print("Also: package.module:factory (your own nn.Module) and hf:PATH (a local Hugging Face config).")


def spectrum_command(
    model: Annotated[str, typer.Argument(help="Built-in name (see `muonprof models`), module:factory or hf:PATH.")],
    steps: Annotated[
        int, typer.Option("--steps", callback=in_range(1), help="Training steps to capture in, after the burn-in.")
    ] = 20,
    every: Annotated[
        int, typer.Option("--every", callback=in_range(1), help="Capture every K steps (and the first and last).")
    ] = 10,
    warmup_steps: Annotated[
        int,
        typer.Option(
            "--warmup-steps",
            callback=in_range(0),
            help=f"Burn-in steps before the first capture (default {DEFAULT_WARMUP}).",
        ),
    ] = DEFAULT_WARMUP,
    captures: Annotated[
        int | None,
        typer.Option(
            "--captures", callback=in_range(1), help="Capture K times, spread evenly over --steps (replaces --every)."
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            callback=in_range(0),
            help=f"Also keep the last T raw gradients per Muon layer (default min({DEFAULT_T}, --steps); 0: none).",
        ),
    ] = None,
    window_mb: Annotated[
        float,
        typer.Option(
            "--window-mb",
            callback=in_range(0, lo_open=True),
            help="Byte cap of the window in MiB (layers above it are skipped).",
        ),
    ] = WINDOW_BYTES / 2**20,
    batch_size: Annotated[
        int, typer.Option("--batch-size", callback=in_range(1), help="Sequences (or images) per batch.")
    ] = 8,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", callback=in_range(1), help="Tokens per sequence (language models).")
    ] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="Train with muon (ProfiledMuon) or adamw.")] = "muon",
    lr: Annotated[
        float | None,
        typer.Option("--lr", callback=in_range(0, lo_open=True), help="Learning rate (default 0.02 muon, 1e-3 adamw)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Text file/folder, 'stdlib' (default), 'random'; images: synthetic, digits."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    seed: Annotated[
        int, typer.Option("--seed", callback=in_range(0, 2**63 - 1), help="Seeds the init and the batches.")
    ] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Spectra file (default: MODEL.spectra.pt).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG of the spectra here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-layer statistics as JSON.")] = False,
    save_matrices: Annotated[
        bool, typer.Option("--save-matrices", help="Also store G and M themselves at the last step.")
    ] = False,
) -> None:
    """Train MODEL for real and record the singular values of every weight matrix's gradient and momentum."""
    import torch

    from .._files import OutputPathError, check_writable
    from ..capture import CaptureError, capture_spectra, check_window, plan_captures, save_spectra
    from ..data import DataError
    from ..device import DeviceError, resolve_device
    from ..models import ModelSpecError, parse_overrides
    from ..workload import WorkloadError, build_workload

    if optimizer not in ("muon", "adamw"):
        fail(f"--optimizer must be muon or adamw, got {optimizer!r}", 2)
    window_bytes = int(window_mb * 2**20)
    try:
        planned = plan_captures(steps, every, warmup_steps=warmup_steps, captures=captures)
        window = min(DEFAULT_T, steps) if window is None else window
        check_window(window, steps, window_bytes)
    except ValueError as err:
        fail(str(err), 2)
    out = out if out is not None else Path(f"{safe_name(model)}.spectra.pt")
    try:
        check_writable(out)
        if plot is not None:
            check_writable(plot)
        torch_device = resolve_device(device)
        overrides = parse_overrides(set_ or [])
        with console.status(Text(f"building {model} and its data"), spinner="dots") if not as_json else nullcontext():
            workload = build_workload(
                model,
                overrides=overrides,
                data=data,
                batch_size=batch_size,
                seq_len=seq_len,
                seed=seed,
                device=torch_device,
            )
    except (ModelSpecError, DataError, WorkloadError, DeviceError, OutputPathError) as err:
        fail(str(err), 2)

    shown = console if not as_json else err_console
    params = sum(p.numel() for p in workload.model.parameters())
    shown.print(
        styled(
            (model, "bold"),
            f": {params / 1e6:,.2f}M parameters on {torch_device}; data: {workload.data['description']}; "
            f"burn-in {warmup_steps} steps, then capturing at steps {', '.join(map(str, planned))}",
        )
    )
    progress = training_progress(shown, as_json)
    try:
        with progress:
            task = progress.add_task("training", total=warmup_steps + steps, loss="-")

            def on_step(step: int, loss: float) -> None:
                progress.update(task, advance=1, loss=f"{loss:.4f}")

            spectra = capture_spectra(
                workload,
                steps=steps,
                every=every,
                warmup_steps=warmup_steps,
                captures=captures,
                window=window,
                window_bytes=window_bytes,
                optimizer=optimizer,
                lr=lr,
                seed=seed,
                save_matrices=save_matrices,
                on_step=on_step,
                command=" ".join(["muonprof", *sys.argv[1:]]),
            )
    except CaptureError as err:
        fail(f"{err} (no spectra file written)")
    except torch.OutOfMemoryError:
        fail(f"out of memory on {torch_device}: try a smaller --batch-size or --seq-len (no spectra file written)")
    except (DataError, WorkloadError) as err:
        fail(str(err), 2)
    except KeyboardInterrupt:  # a capture is one training run: redone whole, never half-saved
        fail("interrupted (no spectra file written; run the same command again to redo it)", 130)

    save_spectra(spectra, out)
    if plot is not None:
        from ..plots.spectrum import plot_spectra

        plot_spectra(spectra, plot)
    timings = spectra.meta["timings"]
    if as_json:
        summary = spectra.summary()
        summary["files"] = {"spectra": str(out), "plot": str(plot) if plot else None}
        print_json(summary, default=_json_default)
        return
    console.print(_layer_table(spectra))
    console.print(
        f"time: training {timings['train_s']:.1f} s ({timings['train_per_step_s'] * 1e3:.0f} ms/step), "
        f"capture {timings['capture_s']:.1f} s ({len(spectra.captures)} captures); "
        f"loss {spectra.losses[0]:.3f} -> {spectra.losses[-1]:.3f}"
    )
    if spectra.window is not None:
        console.print(_window_line(spectra.window))
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _window_line(window: Any) -> str:
    """One line on the gradient window: its steps, layers, size and what the byte cap left out."""
    line = (
        f"gradient window: steps {window.start_step}-{window.start_step + window.length - 1}, "
        f"{len(window.grads)} layers, {window.nbytes / 2**20:.1f} MiB"
    )
    if window.skipped:
        line += f"; {len(window.skipped)} layers over the {window.byte_cap / 2**20:.0f} MiB cap skipped"
    return line


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.0f}%"


def _layer_table(spectra: Any) -> Table:
    """One row per matrix; ``a→b`` is the value at the first and at the last capture."""
    first, last = spectra.captures[0], spectra.captures[-1]
    first_stats = spectra.stats("momentum", first.step)
    last_stats = spectra.stats("momentum", last.step)
    grad_stats = spectra.stats("grad", last.step)
    drift = spectra.drift()
    same = first.step == last.step
    span = f"step {last.step}" if same else f"step {first.step}→{last.step}"
    table = Table(
        title=f"momentum M spectra ({span}, after {spectra.warmup_steps} burn-in steps); "
        "ranks hold 90% of the energy (E) / nuclear norm (N)",
        caption="svmin: smallest singular value of M/‖M‖_F (what Newton-Schulz must lift to ~1); "
        "drift: relative change first→last capture of the r90 N share of min(m, n) and of ‖M‖_*",
    )
    table.add_column("layer", overflow="fold", min_width=12)
    table.add_column("role", no_wrap=True, min_width=9)
    table.add_column("shape", justify="right")
    for col in ("stable rank", "eff. rank", "r90 E", "r90 N", "svmin", "G stable", "drift r90N", "drift ‖M‖*"):
        table.add_column(col, justify="right", min_width=5)
    for layer in spectra.layers:
        a, b, g = first_stats[layer.name], last_stats[layer.name], grad_stats[layer.name]

        def moved(key: str, fmt: str = "{:.1f}", a: dict = a, b: dict = b) -> str:
            return fmt.format(b[key]) if same else f"{fmt.format(a[key])}→{fmt.format(b[key])}"

        table.add_row(
            layer.name.removesuffix(".weight") + ("" if layer.optimizer == "muon" else " (adamw)"),
            layer.role,
            "x".join(map(str, layer.matrix_shape)),
            moved("stable_rank"),
            moved("effective_rank"),
            moved("energy_rank_90", "{:d}"),
            moved("nuclear_rank_90", "{:d}"),
            f"{b['sv_min']:.0e}",
            f"{g['stable_rank']:.1f}",
            _percent(drift[layer.name]["nuclear_rank_90_share_change"]),
            _percent(drift[layer.name]["nuclear_change"]),
        )
    return table


def _json_default(value: Any) -> Any:
    return str(value)
