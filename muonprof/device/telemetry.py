"""Live device readings (memory, power, clocks, temperature, throttling) taken while a benchmark runs.

A benchmark figure means little without knowing whether the GPU was power- or thermal-throttled while it ran, so
bench samples these in a background thread (:class:`TelemetrySampler`) and stores the summary next to the timings.
Vendor libraries are optional and fragile (amdsmi's PyPI wheel prints to stdout and raises ``KeyError`` on import
when ROCm is missing), so every backend is tried behind a guard and the next one down is used on failure.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import torch

Sample = dict[str, Any]  # field -> float | str | None; see FIELDS

#: Numeric fields every backend reports (None where it cannot).
FIELDS = (
    "memory_used_bytes",
    "power_w",
    "sm_clock_mhz",
    "max_sm_clock_mhz",
    "temperature_c",
    "utilization_pct",
)

#: NVML clocks-event (formerly "throttle") reason bits, by the names we print.
NVML_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

#: Reasons that mean the benchmark ran slower than the hardware can (as opposed to idling or user settings).
THROTTLING_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)


def decode_nvml_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clocks-event reasons mask (unknown bits as hex)."""
    names = [name for bit, name in NVML_REASONS.items() if mask & bit]
    unknown = mask & ~sum(NVML_REASONS)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def empty_sample() -> Sample:
    """A sample with every field unknown."""
    sample: Sample = dict.fromkeys(FIELDS)
    sample["throttle_reasons"] = None
    return sample


class Telemetry:
    """One device's readings. ``sample()`` must be cheap and must not raise; ``close()`` releases the library."""

    name = "none"

    def sample(self) -> Sample:
        """Current readings; fields this backend cannot read are None."""
        return empty_sample()

    def close(self) -> None:
        """Release library handles (idempotent)."""

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe(fn: Any, *args: Any) -> Any:
    """Call a vendor getter, None on any failure: a missing sensor must not lose the other readings."""
    try:
        return fn(*args)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------------- NVIDIA


class NvmlTelemetry(Telemetry):
    """NVIDIA via pynvml (nvidia-ml-py). The NVML handle is matched by PCI bus id, since NVML ignores
    ``CUDA_VISIBLE_DEVICES`` and torch's ``cuda:0`` may be NVML's GPU 3."""

    name = "nvml"

    def __init__(self, device: torch.device, pynvml: ModuleType | None = None) -> None:
        if pynvml is None:
            import pynvml
        self._nvml = pynvml
        pynvml.nvmlInit()
        self._open = True
        try:
            self._handle = self._find_handle(device)
        except Exception:
            self.close()
            raise

    def _find_handle(self, device: torch.device) -> Any:
        nvml = self._nvml
        index = device.index if device.index is not None else 0
        props = torch.cuda.get_device_properties(index) if torch.cuda.is_available() else None
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            dev = getattr(props, "pci_device_id", 0) or 0
            domain = getattr(props, "pci_domain_id", 0) or 0
            with contextlib.suppress(Exception):
                return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0".encode())
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            with contextlib.suppress(Exception):
                return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return nvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> Sample:
        nvml, h = self._nvml, self._handle
        out = empty_sample()
        mem = _safe(nvml.nvmlDeviceGetMemoryInfo, h)
        out["memory_used_bytes"] = float(mem.used) if mem is not None else None
        power = _safe(nvml.nvmlDeviceGetPowerUsage, h)  # milliwatts
        out["power_w"] = power / 1000.0 if power is not None else None
        sm = nvml.NVML_CLOCK_SM if hasattr(nvml, "NVML_CLOCK_SM") else 1
        clock = _safe(nvml.nvmlDeviceGetClockInfo, h, sm)
        out["sm_clock_mhz"] = float(clock) if clock is not None else None
        max_clock = _safe(nvml.nvmlDeviceGetMaxClockInfo, h, sm)
        out["max_sm_clock_mhz"] = float(max_clock) if max_clock is not None else None
        temp = _safe(nvml.nvmlDeviceGetTemperature, h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        out["temperature_c"] = float(temp) if temp is not None else None
        util = _safe(nvml.nvmlDeviceGetUtilizationRates, h)
        out["utilization_pct"] = float(util.gpu) if util is not None else None
        getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        mask = _safe(getter, h) if getter is not None else None
        out["throttle_reasons"] = ",".join(decode_nvml_reasons(int(mask))) if mask is not None else None
        return out

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


# ------------------------------------------------------------------------------------------------------------ AMD

_AMDSMI: tuple[ModuleType | None, str | None] | None = None


def import_amdsmi() -> tuple[ModuleType | None, str | None]:
    """Import amdsmi once, silently: (module, None) or (None, note).

    Without ROCm its wheel prints "Unable to find libamd_smi.so ..." to stdout and raises ``KeyError`` from the
    ctypes wrapper, which would corrupt ``--json`` output and crash a plain ``except ImportError``. The result is
    cached so the noisy import runs at most once per process.
    """
    global _AMDSMI
    if _AMDSMI is not None:
        return _AMDSMI
    captured = io.StringIO()
    before = set(sys.modules)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            import amdsmi
        _AMDSMI = (amdsmi, None)
    except (Exception, SystemExit) as err:  # KeyError, OSError, ImportError ...; a wrapper calling exit() too
        for name in set(sys.modules) - before:  # drop half-imported submodules
            if name == "amdsmi" or name.startswith("amdsmi."):
                sys.modules.pop(name, None)
        said = " ".join(captured.getvalue().split())
        note = f"amdsmi unavailable: {type(err).__name__}: {err}"
        if said:
            note += f" ({said[:200]})"
        _AMDSMI = (None, note)
    return _AMDSMI


class AmdSmiTelemetry(Telemetry):
    """AMD via amdsmi, matched to the torch device by PCI bus id (falls back to the index)."""

    name = "amdsmi"

    def __init__(self, device: torch.device, amdsmi: ModuleType | None = None) -> None:
        if amdsmi is None:
            amdsmi, note = import_amdsmi()
            if amdsmi is None:
                raise RuntimeError(note)
        self._smi = amdsmi
        amdsmi.amdsmi_init()
        self._open = True
        try:
            self._handle = self._find_handle(device)
        except Exception:
            self.close()
            raise

    def _find_handle(self, device: torch.device) -> Any:
        handles = self._smi.amdsmi_get_processor_handles()
        if not handles:
            raise RuntimeError("amdsmi: no AMD GPU handles")
        index = device.index if device.index is not None else 0
        props = torch.cuda.get_device_properties(index) if torch.cuda.is_available() else None
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            dev = getattr(props, "pci_device_id", 0) or 0
            for h in handles:
                bdf = str(_safe(self._smi.amdsmi_get_gpu_device_bdf, h) or "")
                match = re.match(r"(?:[0-9a-fA-F]+:)?([0-9a-fA-F]+):([0-9a-fA-F]+)\.", bdf)
                if match and int(match.group(1), 16) == bus and int(match.group(2), 16) == dev:
                    return h
        if index >= len(handles):
            raise RuntimeError(f"amdsmi sees {len(handles)} GPU(s), no match for cuda:{index}")
        return handles[index]

    def sample(self) -> Sample:
        smi, h = self._smi, self._handle
        out = empty_sample()

        def num(value: Any, scale: float = 1.0) -> float | None:
            return float(value) * scale if isinstance(value, int | float) else None

        vram = _safe(smi.amdsmi_get_gpu_vram_usage, h) or {}
        out["memory_used_bytes"] = num(vram.get("vram_used"), 1024.0 * 1024.0)  # MB
        power = _safe(smi.amdsmi_get_power_info, h) or {}
        watts = power.get("current_socket_power")
        if not isinstance(watts, int | float):
            watts = power.get("average_socket_power")
        out["power_w"] = num(watts)
        clk_type = getattr(getattr(smi, "AmdSmiClkType", None), "GFX", None)
        clock = (_safe(smi.amdsmi_get_clock_info, h, clk_type) or {}) if clk_type is not None else {}
        out["sm_clock_mhz"] = num(clock.get("clk"))
        out["max_sm_clock_mhz"] = num(clock.get("max_clk"))
        temp_type = getattr(getattr(smi, "AmdSmiTemperatureType", None), "HOTSPOT", None)
        metric = getattr(getattr(smi, "AmdSmiTemperatureMetric", None), "CURRENT", None)
        if temp_type is not None and metric is not None:
            out["temperature_c"] = num(_safe(smi.amdsmi_get_temp_metric, h, temp_type, metric))
        activity = _safe(smi.amdsmi_get_gpu_activity, h) or {}
        out["utilization_pct"] = num(activity.get("gfx_activity"))
        return out

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            with contextlib.suppress(Exception):
                self._smi.amdsmi_shut_down()


# ---------------------------------------------------------------------------------------------- torch / CPU / MPS


class TorchTelemetry(Telemetry):
    """What torch itself knows about a GPU (memory only) when no vendor library works."""

    name = "torch"

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def sample(self) -> Sample:
        out = empty_sample()
        if self._device.type == "cuda":
            free_total = _safe(torch.cuda.mem_get_info, self._device)
            if free_total is not None:
                out["memory_used_bytes"] = float(free_total[1] - free_total[0])
            else:
                out["memory_used_bytes"] = _safe(lambda: float(torch.cuda.memory_allocated(self._device)))
        elif self._device.type == "mps":
            mps = getattr(torch, "mps", None)
            getter = getattr(mps, "driver_allocated_memory", None)
            out["memory_used_bytes"] = _safe(lambda: float(getter())) if getter is not None else None
        return out


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


class CpuTelemetry(Telemetry):
    """The process's resident memory, the current CPU clock where readable, and the 1-minute load as utilization.

    ``max_sm_clock_mhz`` stays None: CPU governors idle and boost far from any nominal maximum, so "below 90% of
    max" would flag every CPU run as throttled.
    """

    name = "cpu"

    @staticmethod
    def _clock() -> float | None:
        text = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
        if text and text.strip().isdigit():
            return float(text) / 1000.0
        text = _read("/proc/cpuinfo")
        if text:
            mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)]
            if mhz:
                return sum(mhz) / len(mhz)
        return None

    @staticmethod
    def _rss() -> float | None:
        text = _read("/proc/self/status")
        if text:
            match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
            if match:
                return float(match.group(1)) * 1024.0
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, not current: the best we have
            return float(peak) * (1.0 if sys.platform == "darwin" else 1024.0)
        except (ImportError, OSError):
            return None

    def sample(self) -> Sample:
        out = empty_sample()
        out["memory_used_bytes"] = self._rss()
        out["sm_clock_mhz"] = self._clock()
        with contextlib.suppress(OSError, AttributeError):
            cores = os.cpu_count() or 1
            out["utilization_pct"] = min(100.0, 100.0 * os.getloadavg()[0] / cores)
        return out


def open_telemetry(device: torch.device, verbose: bool = False) -> tuple[Telemetry, list[str]]:
    """The best telemetry for ``device`` and notes on the backends that failed on the way down.

    Never raises: the last resort is :class:`TorchTelemetry` (GPU) or :class:`CpuTelemetry`. ``verbose`` is accepted
    for symmetry with the command; the notes are always returned and it is for the caller to show them or not.
    """
    del verbose
    notes: list[str] = []
    if device.type == "cuda":
        if torch.version.hip:
            try:
                return AmdSmiTelemetry(device), notes
            except Exception as err:
                notes.append(str(err) if "amdsmi" in str(err) else f"amdsmi failed: {type(err).__name__}: {err}")
        else:
            try:
                return NvmlTelemetry(device), notes
            except Exception as err:
                notes.append(f"pynvml unavailable: {type(err).__name__}: {err}")
        return TorchTelemetry(device), notes
    if device.type == "mps":
        return TorchTelemetry(device), notes
    return CpuTelemetry(), notes


# ------------------------------------------------------------------------------------------------------- sampler


class TelemetrySampler:
    """Sample ``telemetry`` every ``interval_s`` in a daemon thread for the length of a ``with`` block.

    One sample is taken on entry and one on exit, so even a block shorter than the interval has two readings.
    """

    def __init__(self, telemetry: Telemetry, interval_s: float = 0.1, clock_drop: float = 0.9) -> None:
        self.telemetry = telemetry
        self.interval_s = interval_s
        self.clock_drop = clock_drop
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.duration_s = 0.0

    def _take(self) -> None:
        try:
            sample = self.telemetry.sample()
        except Exception:  # a backend must not kill the benchmark it watches
            return
        sample["t"] = time.perf_counter() - self._started
        self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __enter__(self) -> TelemetrySampler:
        self._started = time.perf_counter()
        self._take()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="muonprof-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval_s))
            self._thread = None
        self._take()
        self.duration_s = time.perf_counter() - self._started

    def summary(self) -> dict[str, Any]:
        """min/median/max per numeric field, the throttle reasons seen, and whether the run was throttled."""
        return summarize(self.samples, backend=self.telemetry.name, clock_drop=self.clock_drop)


def summarize(samples: list[Sample], backend: str = "", clock_drop: float = 0.9) -> dict[str, Any]:
    """Summarize samples; ``throttled`` when the SM clock fell below ``clock_drop`` x max (outside idle) or NVML
    reported power/thermal slowdown in any sample."""
    out: dict[str, Any] = {"backend": backend, "samples": len(samples)}
    for name in FIELDS:
        values = [float(s[name]) for s in samples if isinstance(s.get(name), int | float)]
        out[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None
    reasons_seen: dict[str, int] = {}
    clock_low: list[float] = []
    max_clock: float | None = None
    for s in samples:
        reasons = [r for r in str(s.get("throttle_reasons") or "").split(",") if r]
        for r in reasons:
            reasons_seen[r] = reasons_seen.get(r, 0) + 1
        clock, top = s.get("sm_clock_mhz"), s.get("max_sm_clock_mhz")
        if isinstance(clock, int | float) and isinstance(top, int | float) and top > 0:
            idle_only = bool(reasons) and set(reasons) <= {"gpu_idle"}
            if clock < clock_drop * top and not idle_only:
                clock_low.append(float(clock))
                max_clock = float(top)
    out["throttle_reasons"] = reasons_seen
    why: list[str] = []
    bad = {r: n for r, n in reasons_seen.items() if r in THROTTLING_REASONS}
    if bad:
        why.append("reported " + ", ".join(f"{r} in {n}/{len(samples)} samples" for r, n in sorted(bad.items())))
    if clock_low and max_clock is not None:
        why.append(
            f"SM clock fell to {min(clock_low):.0f} MHz (< {clock_drop:.0%} of max {max_clock:.0f} MHz) "
            f"in {len(clock_low)}/{len(samples)} samples"
        )
    out["throttled"] = bool(why)
    out["throttle_reason"] = "; ".join(why) if why else None
    return out
