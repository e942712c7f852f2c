"""The ``muonprof`` command line. Errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .console import console, err_console, fail, print_json, styled

# Typer >= 0.20 vendors click (typer._click), older releases use click itself: take the exception classes from
# wherever typer's own BadParameter lives, so both kinds are caught.
_click_errors = sys.modules[typer.BadParameter.__module__]


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors as one line, Ctrl-C as one line, for every subcommand.

    Typer draws a usage error (a bad option value, an unknown option or command) as a six-line rich box, and
    turns Ctrl-C into a silent exit 130 that skips our cleanup. Both are handled here, at the root group, so the
    installed command and in-process runners (tests, ``CliRunner``) behave the same.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            from ._files import remove_created_folders

            remove_created_folders()
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click_errors.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # the help text is the message, printed already
                sys.exit(err.exit_code)
            path = err.ctx.command_path if err.ctx is not None else "muonprof"
            message = " ".join(err.format_message().split())
            err_console.print(
                styled(("error:", "bold red"), f" {path}: {message} (see '{path} --help')"), soft_wrap=True
            )
            sys.exit(err.exit_code)
        except _click_errors.ClickException as err:
            err_console.print(
                styled(("error:", "bold red"), " " + " ".join(err.format_message().split())), soft_wrap=True
            )
            sys.exit(err.exit_code)
        except (typer.Abort, getattr(_click_errors, "Abort", typer.Abort)):
            err_console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="muonprof",
    help="Profile, tune and run the Muon family of optimizers per layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profile_app = typer.Typer(help="Check and inspect muonprof JSON profiles.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


def _version_callback(value: bool) -> None:
    if value:
        import torch

        console.print(f"muonprof {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Profile, tune and run the Muon family of optimizers per layer."""


@profile_app.command("check")
def profile_check(
    file: Annotated[Path, typer.Argument(help="The profile JSON to validate.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Also check it against this model (built-in or module:factory)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Validate a profile against the schema and, given --model, against that model's layers."""
    from .profile import ProfileError, fingerprint, load_profile, resolve_layers

    result: dict[str, Any] = {"file": str(file), "valid": False}
    try:
        profile = load_profile(file)
        result.update(valid=True, format=profile.format, layer_entries=len(profile.layers))
        rows: list[dict[str, Any]] = []
        if model is not None:
            from .models import ModelSpecError, load_model
            from .optim.routing import fan_layouts, route_module

            try:
                module = load_model(model)
            except ModelSpecError as err:
                fail(str(err), 2)
            shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
            plans = resolve_layers(profile, shapes, route_module(module), layouts=fan_layouts(module))
            result["model"] = {"spec": model, "fingerprint": fingerprint(shapes.items())}
            rows = [
                {
                    "name": plan.name,
                    "shape": list(plan.shape),
                    "optimizer": plan.optimizer,
                    "source": plan.reason,
                    "ortho": (
                        "U V^T of the factors" if plan.momentum_rank else plan.ortho.label() if plan.ortho else ""
                    ),
                    "momentum": plan.momentum_label if plan.optimizer == "muon" else "",
                    "lr_factor": round(plan.lr_factor, 6),
                }
                for plan in plans.values()
            ]
            result["layers"] = rows
    except ProfileError as err:
        if as_json:
            result["errors"] = str(err).splitlines()
            print_json(result)
            raise typer.Exit(1) from None
        fail(str(err))
    if as_json:
        print_json(result)
        return
    console.print(styled(("ok", "green"), f" {file}: valid {profile.format}, {len(profile.layers)} layer entries"))
    if rows:
        table = Table(title=f"{file} on {model}")
        # The momentum column only when a layer uses LiMuon's storm or low-rank momentum.
        momentum = any(r["momentum"] not in ("", "ema") for r in rows)
        columns = ("parameter", "shape", "optimizer", "source", "orthogonalizer", "momentum", "lr factor")
        for col in columns if momentum else tuple(c for c in columns if c != "momentum"):
            table.add_column(col)
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            cells = [r["name"], shape, r["optimizer"], r["source"], r["ortho"], f"{r['lr_factor']:.4g}"]
            if momentum:
                cells.insert(5, r["momentum"])
            table.add_row(*cells)
        console.print(table)
        from .optim.state_memory import format_bytes, plans_state_bytes

        state = plans_state_bytes(plans.values())
        console.print(
            f"optimizer state (fp32): Muon {format_bytes(state['muon'])}, AdamW {format_bytes(state['adamw'])}"
        )
        if any(p.momentum == "storm" for p in plans.values()):
            console.print("storm layers: step with optimizer.step(closure), two gradient evaluations per step")


@profile_app.command("show")
def profile_show(
    file: Annotated[Path, typer.Argument(help="The profile JSON to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
) -> None:
    """Show a profile's per-layer recipes, what was measured behind them and the expected step-time saving."""
    from .profile import ProfileError, load_profile

    try:
        profile = load_profile(file)
    except ProfileError as err:
        fail(str(err))
    rows = []
    for name, entry in profile.layers.items():
        settings = entry.explicit()
        measured = entry.measured
        recipe = {k: v for k, v in settings.items() if k not in ("role", "shape", "lr_factor", "measured")}
        rows.append(
            {
                "name": name,
                "role": entry.role,
                "recipe": recipe,
                "lr_scale": entry.lr_scale,
                "time_ms": measured.time_ms if measured else None,
                "baseline_time_ms": measured.baseline_time_ms if measured else None,
                "alignment": measured.alignment if measured else None,
                "baseline_alignment": measured.baseline_alignment if measured else None,
            }
        )
    timed = [r for r in rows if r["time_ms"] is not None and r["baseline_time_ms"] is not None]
    total = sum(r["time_ms"] for r in timed)
    base = sum(r["baseline_time_ms"] for r in timed)
    summary = {
        "file": str(file),
        "model": profile.model.model_dump() if profile.model else None,
        "device": (profile.provenance.device_name or profile.provenance.device) if profile.provenance else None,
        "layers": rows,
        "ortho_time_ms": total if timed else None,
        "baseline_time_ms": base if timed else None,
        "speedup": base / total if timed and total > 0 else None,
        "race": (profile.provenance.model_dump().get("race") if profile.provenance else None),
    }
    if as_json:
        print_json(summary)
        return
    model = profile.model.name if profile.model else "(no model recorded)"
    table = Table(title=f"{file}: {model}, {len(rows)} layer entries")
    for col in ("layer", "role", "recipe", "lr scale", "time ms", "default ms", "alignment", "default"):
        table.add_column(col, justify="left" if col in ("layer", "role", "recipe") else "right")
    for r in rows:
        recipe = r["recipe"]
        text = _recipe_text(recipe)
        table.add_row(
            r["name"].removesuffix(".weight"),
            r["role"] or "",
            text,
            f"{r['lr_scale']:.3g}" if r["lr_scale"] is not None else "",
            f"{r['time_ms']:.3g}" if r["time_ms"] is not None else "",
            f"{r['baseline_time_ms']:.3g}" if r["baseline_time_ms"] is not None else "",
            f"{r['alignment']:.3f}" if r["alignment"] is not None else "",
            f"{r['baseline_alignment']:.3f}" if r["baseline_alignment"] is not None else "",
        )
    console.print(table)
    if timed and total > 0:
        device = summary["device"] or "the tuning device"
        console.print(
            f"orthogonalization per step: {total:.4g} ms vs {base:.4g} ms with the default "
            f"({base / total:.2f}x) on {device}"
        )
    race = summary["race"]
    if race:
        from .commands.tune import race_table

        console.print(race_table(race))
        console.print(Text(f"race: {race.get('reason', '')}"))
    elif profile.provenance is not None and profile.provenance.study:
        console.print(Text("race: none recorded (this profile was not proven in training by muonprof tune)"))


def _recipe_text(recipe: dict[str, Any]) -> str:
    method = recipe.get("method", "newton_schulz")
    if method == "svd":
        return "svd"
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(recipe.get("dtype", ""), recipe.get("dtype", ""))
    gram = "g" if recipe.get("gram") else ""  # Gram Newton-Schulz, as in OrthoConfig.label()
    ns = f"{gram}ns{recipe.get('ns_steps', '')}-{recipe.get('coefficients', '')}"
    if method == "newton_schulz":
        return f"{ns} {dtype}".strip()
    extra = f" r{recipe.get('rank')}"
    if method == "lowrank":
        extra += f" {recipe.get('range_finder', 'power')} p{recipe.get('power_iters', '')}"
    return f"{method}{extra} {ns} {dtype}".strip()


@profile_app.command("schema")
def profile_schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of the muonprof.profile/1 format."""
    from .profile import atomic_write_text, json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        print(text, end="")
    else:
        from ._files import OutputPathError, check_writable

        try:
            check_writable(out)
            atomic_write_text(out, text)
        except OutputPathError as err:
            fail(str(err), 2)
        except OSError as err:
            fail(f"{out}: cannot write ({err.strerror or type(err).__name__})", 2)
        console.print(f"wrote {out}")


# Command families live in muonprof.commands, one module each; this file is their table of contents.
for _command_module in ("spectrum", "bench", "device", "tune", "validate"):
    importlib.import_module(f".commands.{_command_module}", __package__).register(app)


def main() -> None:
    """Console-script entry point."""
    from .interrupts import recorded_interrupts

    try:
        with recorded_interrupts():
            app()
    except KeyboardInterrupt:
        from ._files import remove_created_folders

        remove_created_folders()
        err_console.print("interrupted")
        sys.exit(130)
