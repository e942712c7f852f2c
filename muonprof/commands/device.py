"""``muonprof device``: what this machine's device is, how it is doing right now, and how fast it multiplies.

The matmul rates per dtype are the yardstick for every later figure (bench states throughput as a fraction of
them) and decide whether Newton-Schulz should run in bf16 here at all.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ._common import console, err_console, fail, print_json, styled


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _num(value: Any, fmt: str = ".4g", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:{fmt}}{unit}"
    return str(value) or "-"


def _device_table(info: dict[str, Any]) -> Table:
    table = Table(title="device", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("device", info["device"]),
        ("backend", info["backend"]),
        ("name", info["name"]),
        ("memory", _bytes(info["total_memory_bytes"])),
        ("driver", info["driver_version"]),
        ("runtime", info["runtime_version"]),
        ("compute capability" if info["backend"] == "cuda" else "arch", info["compute_capability"]),
        ("multiprocessors", info["multiprocessors"]),
        ("CPU cores", info["cpu_cores"]),
        ("torch threads", info["torch_threads"]),
        ("CPU matmul flags", " ".join(info["cpu_flags"]) or ("none" if info["backend"] == "cpu" else None)),
        ("torch", info["torch_version"]),
    ]
    for key, value in rows:
        if value is not None:
            table.add_row(key, str(value))
    return table


def _telemetry_table(sample: dict[str, Any], backend: str) -> Table:
    table = Table(title=f"telemetry ({backend}, one sample)", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    clock = "CPU clock" if backend == "cpu" else "SM clock"
    rows = [
        ("memory used" + (" (this process)" if backend == "cpu" else ""), _bytes(sample.get("memory_used_bytes"))),
        ("power", _num(sample.get("power_w"), ".0f", " W")),
        (clock, _num(sample.get("sm_clock_mhz"), ".0f", " MHz")),
        (f"max {clock}", _num(sample.get("max_sm_clock_mhz"), ".0f", " MHz")),
        ("temperature", _num(sample.get("temperature_c"), ".0f", " °C")),
        ("load (1 min)" if backend == "cpu" else "utilization", _num(sample.get("utilization_pct"), ".0f", " %")),
        ("clock event reasons", sample.get("throttle_reasons")),
    ]
    for key, value in rows:
        if value not in (None, "-"):
            table.add_row(key, str(value) or "none")
    return table


def _matmul_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="matmul (median per matmul)", title_justify="left")
    for col, justify in (
        ("dtype", "left"),
        ("m x n x k", "left"),
        ("ms", "right"),
        ("TFLOP/s", "right"),
        ("spread", "right"),
        ("runs", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        shape = f"{r['m']}x{r['n']}x{r['k']}"
        if r["skipped"]:
            table.add_row(r["dtype"], shape, "-", "-", "-", "-", styled(("skipped:", "yellow"), f" {r['skipped']}"))
            continue
        runs = f"{r['repeats']}" + (f"x{r['inner']}" if r["inner"] > 1 else "")
        table.add_row(
            r["dtype"],
            shape,
            f"{r['seconds'] * 1e3:.3g}",
            f"{r['tflops']:.3g}",
            f"{r['spread']:.0%}" if r["spread"] is not None else "-",
            runs,
            "",
        )
    return table


def device_command(
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu).")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout and nothing else.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also say which libraries were missing.")] = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Skip the matmul timing.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller matmuls and budget (about a second on CPU).")] = False,
) -> None:
    """Show the device, a telemetry sample and its measured matmul rates per dtype."""
    import torch

    from ..device import (
        DeviceError,
        DeviceRates,
        TelemetrySampler,
        describe_device,
        measure_matmul,
        open_telemetry,
        resolve_device,
    )

    try:
        dev = resolve_device(device)
    except DeviceError as err:
        fail(str(err), 2)
    info = describe_device(dev)
    telemetry, notes = open_telemetry(dev, verbose=verbose)
    info.notes.extend(notes)
    result: dict[str, Any] = {"device": info.to_json(), "telemetry_backend": telemetry.name}
    warnings: list[str] = []
    result["warnings"] = warnings
    try:
        result["telemetry"] = telemetry.sample()
        load = result["telemetry"].get("utilization_pct")
        if dev.type == "cpu" and not no_probe and isinstance(load, float) and load >= 50:
            # torch's OpenMP threads stall whenever one of them is descheduled, so a busy machine can read 10x slow
            warnings.append(f"the CPU is busy (1-min load {load:.0f}% of {info.cpu_cores} cores): rates will read low")
        if not no_probe:
            with err_console.status(Text("timing matmuls ...")) as status, TelemetrySampler(telemetry) as sampler:
                results = measure_matmul(
                    dev, quick=quick, progress=lambda msg: status.update(Text(f"timing matmuls: {msg}"))
                )
            rates = DeviceRates.from_results(results)
            result.update(
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                matmul=[r.to_json() for r in results],
                rates=rates.to_json(),
                advice=rates.ns_advice(),
                telemetry_during_probe=sampler.summary(),
            )
    finally:
        telemetry.close()

    if as_json:
        print_json(result)
        return
    for line in warnings:
        err_console.print(styled(("warning:", "yellow"), f" {line}"))
    console.print(_device_table(result["device"]))
    console.print(_telemetry_table(result["telemetry"], telemetry.name))
    if "matmul" in result:
        console.print(_matmul_table(result["matmul"]))
        during = result["telemetry_during_probe"]
        if during.get("throttled"):
            console.print(styled(("throttled while timing:", "yellow"), f" {during['throttle_reason']}"))
        if result["float32_matmul_precision"] != "highest" and dev.type == "cuda":
            console.print(f"fp32 matmul precision is {result['float32_matmul_precision']!r} (TF32 allowed)")
        console.print(styled((result["advice"], "bold")))
    if verbose:
        for note in info.notes:
            console.print(styled((f"note: {note}", "dim")))


def register(app: typer.Typer) -> None:
    """Add ``muonprof device`` to ``app``."""
    app.command("device")(device_command)
