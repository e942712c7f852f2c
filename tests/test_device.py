"""muonprof.device and ``muonprof device``: detection, guarded vendor libraries, telemetry summaries, the matmul
probe's harness (on a fake clock) and the command's JSON and error paths. No GPU needed."""

from __future__ import annotations

import builtins
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from muonprof.commands.device import register
from muonprof.device import (
    CpuTelemetry,
    DeviceError,
    DeviceRates,
    MatmulResult,
    NvmlTelemetry,
    Telemetry,
    TelemetrySampler,
    TorchTelemetry,
    best_dtype,
    describe_device,
    detect,
    measure_matmul,
    open_telemetry,
    resolve_device,
    summarize,
    telemetry,
)
from muonprof.device.telemetry import decode_nvml_reasons, empty_sample, import_amdsmi

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ detection


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(None).type in ("cpu", "cuda", "mps")
    assert resolve_device("auto") == resolve_device(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_resolve_device_cuda_without_cuda_is_one_line_error(spec: str) -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--device {spec}: torch sees no CUDA device")
    assert torch.__version__ in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("spec", ["gpu0", "xpu", "cuda:x"])
def test_resolve_device_rejects_unknown(spec: str) -> None:
    with pytest.raises(DeviceError, match=f"--device {spec}"):
        resolve_device(spec)


def test_resolve_device_index_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_describe_device_cpu() -> None:
    info = describe_device(CPU)
    data = info.to_json()
    json.dumps(data)
    assert data["backend"] == "cpu" and data["device"] == "cpu"
    assert info.name and info.cpu_cores and info.cpu_cores >= 1
    assert info.torch_threads == torch.get_num_threads()
    assert info.torch_version == torch.__version__
    assert set(info.cpu_flags) <= set(detect.MATMUL_CPU_FLAGS)
    if Path("/proc/cpuinfo").exists():
        assert info.total_memory_bytes and info.total_memory_bytes > 0


def test_read_cpuinfo_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Fancy Xeon\nflags\t\t: fpu avx2 fma avx512f amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Fancy Xeon\nflags\t\t: fpu\n"
    )
    model, flags = detect.read_cpuinfo(cpuinfo)
    assert model == "Fancy Xeon"
    assert {"avx2", "fma", "avx512f", "amx_bf16", "amx_tile"} <= flags
    assert detect.read_cpuinfo(tmp_path / "missing") == (None, set())


# ---------------------------------------------------------------------------------------------- vendor libraries


@pytest.fixture
def fresh_amdsmi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the cached amdsmi import so each test runs the guard."""
    monkeypatch.setattr(telemetry, "_AMDSMI", None)


def _noisy_failing_import(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make ``import amdsmi`` behave like its ROCm-less wheel: print to stdout, then raise something odd."""
    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "amdsmi":
            print("Unable to find libamd_smi.so library try installing amd-smi-lib from your package manager")
            print("noise on stderr", file=sys.stderr)
            raise exc
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize("exc", [KeyError("libamd_smi.so"), OSError("no lib"), AttributeError("x"), SystemExit(1)])
def test_amdsmi_import_guard_swallows_output_and_odd_errors(
    fresh_amdsmi: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: BaseException
) -> None:
    _noisy_failing_import(monkeypatch, exc)
    module, note = import_amdsmi()
    out, err = capsys.readouterr()
    assert module is None and out == "" and err == ""
    assert note is not None and note.startswith(f"amdsmi unavailable: {type(exc).__name__}")
    assert "Unable to find libamd_smi.so" in note
    # cached: a second call does not import (or print) again
    assert import_amdsmi() == (None, note)


def test_amdsmi_failure_falls_back_to_torch_telemetry(
    fresh_amdsmi: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _noisy_failing_import(monkeypatch, KeyError("libamd_smi.so"))
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    tel, notes = open_telemetry(torch.device("cuda", 0))
    assert isinstance(tel, TorchTelemetry)
    assert len(notes) == 1 and "amdsmi unavailable: KeyError" in notes[0]
    sample = tel.sample()  # no GPU here: torch's getters fail, the sample is just empty
    assert set(sample) >= {"memory_used_bytes", "power_w", "throttle_reasons"}
    assert capsys.readouterr().out == ""


def test_real_amdsmi_import_is_silent(fresh_amdsmi: None, capsys: pytest.CaptureFixture[str]) -> None:
    module, note = import_amdsmi()
    assert capsys.readouterr().out == ""
    assert (module is None) == (note is not None)


class FakeNVMLError(Exception):
    pass


def _fake_pynvml(fail_init: bool) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    nvml.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
    nvml.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    calls: list[str] = []
    nvml.calls = calls  # type: ignore[attr-defined]

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def unsupported(*_: Any) -> Any:
        raise FakeNVMLError("Not Supported")

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerUsage = lambda h: 312_500  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetClockInfo = lambda h, t: 1410  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, t: 1980  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetTemperature = unsupported  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4 | 0x20  # type: ignore[attr-defined]
    nvml.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    return nvml


def test_pynvml_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    tel, notes = open_telemetry(torch.device("cuda", 0))
    assert isinstance(tel, TorchTelemetry)
    assert notes == ["pynvml unavailable: FakeNVMLError: NVML Shared Library Not Found"]
    driver, note = detect.nvml_driver_version()
    assert driver is None and note is not None and "FakeNVMLError" in note


def test_pynvml_missing_module_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    tel, notes = open_telemetry(torch.device("cuda", 0))
    assert isinstance(tel, TorchTelemetry) and notes and notes[0].startswith("pynvml unavailable: ")


def test_real_pynvml_without_driver_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is present")
    monkeypatch.setattr(torch.version, "hip", None)
    tel, notes = open_telemetry(torch.device("cuda", 0))
    assert isinstance(tel, TorchTelemetry) and notes and "pynvml unavailable" in notes[0]


def test_nvml_telemetry_sample_decodes_reasons() -> None:
    nvml = _fake_pynvml(fail_init=False)
    tel = NvmlTelemetry(torch.device("cuda", 0), pynvml=nvml)
    sample = tel.sample()
    assert sample["memory_used_bytes"] == 3 * 2**30 and sample["power_w"] == pytest.approx(312.5)
    assert sample["sm_clock_mhz"] == 1410 and sample["max_sm_clock_mhz"] == 1980
    assert sample["temperature_c"] is None  # one unsupported sensor does not lose the rest
    assert sample["utilization_pct"] == 97
    assert sample["throttle_reasons"] == "sw_power_cap,sw_thermal_slowdown"
    tel.close()
    tel.close()
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_decode_nvml_reasons() -> None:
    assert decode_nvml_reasons(0) == []
    assert decode_nvml_reasons(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    assert decode_nvml_reasons(0x10000) == ["0x10000"]


def test_cpu_telemetry() -> None:
    tel, notes = open_telemetry(CPU)
    assert isinstance(tel, CpuTelemetry) and notes == []
    sample = tel.sample()
    if Path("/proc/self/status").exists():
        assert sample["memory_used_bytes"] and sample["memory_used_bytes"] > 0
    assert sample["power_w"] is None and sample["max_sm_clock_mhz"] is None


# ------------------------------------------------------------------------------------------------------- sampler


def _sample(clock: float | None, top: float | None = 1980.0, reasons: str | None = "", power: float = 300.0) -> dict:
    s = empty_sample()
    s.update(sm_clock_mhz=clock, max_sm_clock_mhz=top, throttle_reasons=reasons, power_w=power)
    return s


def test_summarize_stats_and_no_throttle() -> None:
    samples = [_sample(1980, power=p) for p in (250.0, 300.0, 400.0)]
    summary = summarize(samples, backend="nvml")
    assert summary["samples"] == 3 and summary["backend"] == "nvml"
    assert summary["power_w"] == {"min": 250.0, "median": 300.0, "max": 400.0}
    assert summary["temperature_c"] is None
    assert summary["throttled"] is False and summary["throttle_reason"] is None


def test_summarize_clock_drop_is_throttling() -> None:
    summary = summarize([_sample(1980), _sample(1400), _sample(1950)])
    assert summary["throttled"] is True
    assert "SM clock fell to 1400 MHz" in summary["throttle_reason"] and "1/3 samples" in summary["throttle_reason"]


def test_summarize_idle_clock_drop_is_not_throttling() -> None:
    assert summarize([_sample(210, reasons="gpu_idle"), _sample(1980)])["throttled"] is False


def test_summarize_reported_reasons() -> None:
    summary = summarize([_sample(1980, reasons="sw_thermal_slowdown"), _sample(1980, reasons="sync_boost")])
    assert summary["throttled"] is True and "sw_thermal_slowdown in 1/2 samples" in summary["throttle_reason"]
    assert summary["throttle_reasons"] == {"sw_thermal_slowdown": 1, "sync_boost": 1}


class ScriptedTelemetry(Telemetry):
    name = "scripted"

    def __init__(self, clocks: list[float]) -> None:
        self.clocks = clocks
        self.calls = 0

    def sample(self) -> dict:
        clock = self.clocks[min(self.calls, len(self.clocks) - 1)]
        self.calls += 1
        if clock < 0:
            raise RuntimeError("sensor hiccup")  # must not kill the sampler
        return _sample(clock)


def test_sampler_thread_collects_and_summarizes() -> None:
    import time

    tel = ScriptedTelemetry([1980, -1, 1300, 1300])
    with TelemetrySampler(tel, interval_s=0.005) as sampler:
        time.sleep(0.05)
    assert len(sampler.samples) >= 3 and all("t" in s for s in sampler.samples)
    summary = sampler.summary()
    assert summary["backend"] == "scripted" and summary["throttled"] is True
    assert summary["sm_clock_mhz"]["min"] == 1300 and summary["sm_clock_mhz"]["max"] == 1980


def test_sampler_short_block_has_two_samples() -> None:
    with TelemetrySampler(ScriptedTelemetry([1980]), interval_s=10) as sampler:
        pass
    assert len(sampler.samples) == 2 and sampler.summary()["throttled"] is False


# --------------------------------------------------------------------------------------------------------- probe


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rate_ops(clock: FakeClock, rates: dict[str, float]):
    """Fake matmuls that advance the clock by FLOPs / rate; also records which shapes were built."""
    built: list[tuple[str, int, int, int]] = []

    def make(dtype: str, m: int, n: int, k: int):
        built.append((dtype, m, n, k))

        def op() -> None:
            clock.now += 2 * m * n * k / rates[dtype]

        return op

    make.built = built  # type: ignore[attr-defined]
    return make


def test_probe_skips_by_extrapolation_with_reason() -> None:
    clock = FakeClock()
    make = rate_ops(clock, {"bf16": 0.8e9, "fp32": 100e9})  # emulated bf16 as on AVX2-only EPYC
    shapes = ((1024, 1024, 1024), (4096, 4096, 4096))
    results = measure_matmul(CPU, ("bf16", "fp32"), shapes, budget_s=2.0, clock=clock, make_op=make)
    assert [(r.dtype, r.m) for r in results] == [("bf16", 1024), ("bf16", 4096), ("fp32", 1024), ("fp32", 4096)]
    bf16_small, bf16_big, fp32_small, fp32_big = results

    assert bf16_small.skipped == "est. 11 s > 2 s budget (4 runs at 0.8 GFLOP/s, small probe)"
    assert bf16_small.estimated_s == pytest.approx(2 * 1024**3 / 0.8e9)
    assert bf16_big.skipped is not None and bf16_big.seconds is None and bf16_big.tflops is None

    assert fp32_small.skipped is None
    assert fp32_small.seconds == pytest.approx(2 * 1024**3 / 100e9)
    assert fp32_small.tflops == pytest.approx(0.1)
    assert fp32_small.spread == pytest.approx(0.0)
    assert fp32_small.repeats == 12  # min 3, then until budget/8 = 0.25 s of samples at 21.5 ms each
    assert fp32_big.skipped == "est. 5.5 s > 2 s budget (4 runs at 100 GFLOP/s, 1024x1024x1024)"
    # skipped shapes never allocate their tensors
    assert ("bf16", 1024, 1024, 1024) not in make.built and ("fp32", 4096, 4096, 4096) not in make.built  # type: ignore[attr-defined]

    rates = DeviceRates.from_results(results)
    assert rates.peak_tflops["fp32"] == pytest.approx(0.1)
    assert rates.estimated == ["bf16"] and rates.peak_shape["bf16"] == "probe"
    assert rates.ratio("bf16") == pytest.approx(0.008)
    assert "prefer fp32" in rates.ns_advice() and "0.008x fp32" in rates.ns_advice()
    assert best_dtype(results) == "fp32"
    assert rates.fraction(0.05, "fp32") == pytest.approx(0.5)


def test_probe_median_and_spread_on_scripted_durations() -> None:
    clock = FakeClock()
    durations = iter([0.001] * 4 + [0.02] + [0.010, 0.012, 0.011, 0.050, 0.009])  # probe x4, warm-up, 5 samples

    def make(dtype: str, m: int, n: int, k: int):
        def op() -> None:
            clock.now += next(durations)

        return op

    (row,) = measure_matmul(
        CPU, ("fp32",), ((512, 512, 512),), budget_s=1.0, min_repeats=5, max_repeats=5, clock=clock, make_op=make
    )
    assert row.repeats == 5 and row.inner == 1
    assert row.seconds == pytest.approx(0.011)
    assert row.spread == pytest.approx((0.050 - 0.009) / 0.011)
    assert row.tflops == pytest.approx(2 * 512**3 / 0.011 / 1e12)


def test_probe_inner_loop_for_tiny_ops() -> None:
    clock = FakeClock()
    make = rate_ops(clock, {"fp32": 1e12})
    (row,) = measure_matmul(CPU, ("fp32",), ((256, 256, 256),), budget_s=1.0, clock=clock, make_op=make)
    assert row.inner == 30  # 33.5 us per matmul -> 30 per 1 ms sample
    assert row.seconds == pytest.approx(2 * 256**3 / 1e12)


def test_probe_unsupported_dtype_is_a_skip() -> None:
    def make(dtype: str, m: int, n: int, k: int):
        if dtype == "fp16":
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore")
        return lambda: None

    results = measure_matmul(CPU, ("fp16",), ((64, 64, 64),), clock=FakeClock(), make_op=make, budget_s=1.0)
    assert results[0].skipped == "unsupported: RuntimeError: \"addmm_impl_cpu_\" not implemented for 'Half'"
    assert DeviceRates.from_results(results).best_dtype() is None
    with pytest.raises(ValueError, match="unknown dtype"):
        measure_matmul(CPU, ("int8",))


def test_ns_advice_prefers_bf16_when_faster() -> None:
    rows = [
        MatmulResult("bf16", 4096, 4096, 4096, seconds=1.0, tflops=600.0),
        MatmulResult("fp32", 4096, 4096, 4096, seconds=1.0, tflops=60.0),
    ]
    rates = DeviceRates.from_results(rows)
    assert rates.ns_advice() == "bf16 matmul runs at 10x fp32 here: prefer bf16 for Newton-Schulz"
    assert rates.to_json()["best_dtype"] == "bf16"


def test_real_quick_probe_cpu_fp32() -> None:
    results = measure_matmul(CPU, ("fp32",), ((64, 64, 64), (128, 128, 128)), budget_s=5.0, probe_shape=(64, 64, 64))
    assert [r.skipped for r in results] == [None, None]
    for r in results:
        assert r.seconds and r.seconds > 0 and r.tflops and r.tflops > 0 and r.repeats >= 3
        assert math.isfinite(r.tflops)
    json.dumps([r.to_json() for r in results])


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    register(app)
    return app


def test_cli_json_quick(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["device", "--device", "cpu", "--json", "--quick"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is the JSON object and nothing else
    assert data["device"]["backend"] == "cpu" and data["telemetry_backend"] == "cpu"
    assert {"memory_used_bytes", "power_w", "sm_clock_mhz"} <= set(data["telemetry"])
    assert [r["dtype"] for r in data["matmul"]] == ["bf16"] * 2 + ["fp16"] * 2 + ["fp32"] * 2
    assert any(r["tflops"] for r in data["matmul"] if r["dtype"] == "fp32")
    assert "Newton-Schulz" in data["advice"] or "cannot compare" in data["advice"]
    assert data["telemetry_during_probe"]["samples"] >= 2


def test_cli_no_probe_table(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["device", "--device", "cpu", "--no-probe", "--verbose"])
    assert result.exit_code == 0, result.output
    assert "backend" in result.stdout and "torch threads" in result.stdout and "TFLOP/s" not in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_bad_device_exits_2_with_one_line(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["device", "--device", "cuda", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: torch sees no CUDA device")


def test_cli_warns_when_cpu_is_busy(cli: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    import muonprof.device as device_pkg

    busy = empty_sample()
    busy["utilization_pct"] = 95.0
    monkeypatch.setattr(CpuTelemetry, "sample", lambda self: dict(busy))
    monkeypatch.setattr(device_pkg, "measure_matmul", lambda *a, **k: [])
    result = CliRunner().invoke(cli, ["device", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["matmul"] == [] and data["warnings"] and "CPU is busy" in data["warnings"][0]
    assert data["advice"].startswith("cannot compare bf16 with fp32")
