"""The ``muonprof`` command line. Errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ._version import __version__
from .commands._common import console, err_console, fail

app = typer.Typer(
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
            from .optim.routing import route_module

            try:
                module = load_model(model)
            except ModelSpecError as err:
                fail(str(err), 2)
            shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
            plans = resolve_layers(profile, shapes, route_module(module))
            result["model"] = {"spec": model, "fingerprint": fingerprint(shapes.items())}
            rows = [
                {
                    "name": plan.name,
                    "shape": list(plan.shape),
                    "optimizer": plan.optimizer,
                    "source": plan.reason,
                    "ortho": plan.ortho.label() if plan.ortho else "",
                    "lr_factor": round(plan.lr_factor, 6),
                }
                for plan in plans.values()
            ]
            result["layers"] = rows
    except ProfileError as err:
        if as_json:
            result["errors"] = str(err).splitlines()
            print(json.dumps(result, indent=2))
            raise typer.Exit(1) from None
        fail(str(err))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"[green]ok[/] {file}: valid {profile.format}, {len(profile.layers)} layer entries")
    if rows:
        table = Table(title=f"{file} on {model}")
        for col in ("parameter", "shape", "optimizer", "source", "orthogonalizer", "lr factor"):
            table.add_column(col)
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            table.add_row(r["name"], shape, r["optimizer"], r["source"], r["ortho"], f"{r['lr_factor']:.4g}")
        console.print(table)


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
        atomic_write_text(out, text)
        console.print(f"wrote {out}")


# Command families live in muonprof.commands, one module each; this file is their table of contents.
for _command_module in ("spectrum", "device"):
    importlib.import_module(f".commands.{_command_module}", __package__).register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
