"""Which device to run on and what it is: backend, name, memory, versions and the CPU flags that decide matmul dtypes.

Everything here is cheap and must not fail: a missing driver library becomes a note, not an exception, because
``muonprof device`` is what people run first when something about their setup is wrong.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

#: CPU flags that decide whether bf16/fp16 matmul is native or emulated (often ~100x slower than fp32).
MATMUL_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2", "fma")

_CPUINFO = Path("/proc/cpuinfo")
_MEMINFO = Path("/proc/meminfo")


class DeviceError(ValueError):
    """A ``--device`` that names something this machine (or this torch build) does not have. One line."""


def _torch_build() -> str:
    """Say what kind of torch build this is, for the error that explains why CUDA is missing."""
    if torch.version.hip:
        return f"torch {torch.__version__} is a ROCm {torch.version.hip} build"
    if torch.version.cuda:
        return f"torch {torch.__version__} is a CUDA {torch.version.cuda} build"
    return f"torch {torch.__version__} is a CPU build"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | None) -> torch.device:
    """Turn ``--device`` (auto|cpu|cuda[:i]|mps, None = auto) into a device that is really there.

    ``auto`` prefers cuda (which on ROCm builds is the AMD GPU), then mps, then cpu.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {spec}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: torch sees no CUDA device ({_torch_build()})")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {spec}: MPS is not available (needs Apple silicon and a macOS torch build)")
        return torch.device("mps")
    raise DeviceError(f"--device {spec}: unsupported device type {device.type!r}; use auto, cpu, cuda[:N] or mps")


@dataclass
class DeviceInfo:
    """What ``muonprof device`` reports and bench artifacts embed, so figures can be read against the hardware."""

    device: str
    backend: str  # "cuda" | "rocm" | "mps" | "cpu"
    name: str
    total_memory_bytes: int | None = None
    driver_version: str | None = None
    runtime_version: str | None = None  # torch.version.cuda / torch.version.hip
    compute_capability: str | None = None  # CUDA "9.0"; ROCm gcnArchName
    multiprocessors: int | None = None
    cpu_cores: int | None = None
    torch_threads: int | None = None
    cpu_flags: list[str] = field(default_factory=list)
    torch_version: str = torch.__version__
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def read_cpuinfo(path: Path = _CPUINFO) -> tuple[str | None, set[str]]:
    """Model name and flag set of the first CPU in /proc/cpuinfo (None and empty where there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if model is not None and flags:
            break
    return model, flags


def _total_ram() -> int | None:
    try:
        match = re.search(r"^MemTotal:\s+(\d+)\s+kB", _MEMINFO.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _cpu_cores() -> int | None:
    """Cores this process may use (affinity-aware on Linux), which is what torch's thread pool sees."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def nvml_driver_version() -> tuple[str | None, str | None]:
    """(driver version, note on failure) via pynvml; a missing library is a note, never an exception."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return (version.decode() if isinstance(version, bytes) else str(version)), None
    except Exception as err:
        return None, f"pynvml unavailable: {type(err).__name__}: {err}".strip()


def amdsmi_driver_version() -> tuple[str | None, str | None]:
    """(driver version, note on failure) via amdsmi, imported through the guard in telemetry."""
    from .telemetry import import_amdsmi

    amdsmi, note = import_amdsmi()
    if amdsmi is None:
        return None, note
    try:
        amdsmi.amdsmi_init()
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
            if not handles:
                return None, "amdsmi: no AMD GPU handles"
            info = amdsmi.amdsmi_get_gpu_driver_info(handles[0])
            return str(info.get("driver_version")), None
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception as err:
        return None, f"amdsmi driver query failed: {type(err).__name__}: {err}"


def describe_device(device: torch.device) -> DeviceInfo:
    """Describe ``device`` (from :func:`resolve_device`); notes say what could not be found and why."""
    if device.type == "cuda":
        return _describe_cuda(device)
    if device.type == "mps":
        return DeviceInfo(
            device="mps",
            backend="mps",
            name=f"Apple {platform.processor() or platform.machine()} GPU (MPS)",
            total_memory_bytes=_total_ram(),  # unified memory
            cpu_cores=_cpu_cores(),
            torch_threads=torch.get_num_threads(),
        )
    return _describe_cpu()


def _describe_cpu() -> DeviceInfo:
    notes: list[str] = []
    model, flags = read_cpuinfo()
    if model is None:
        model = platform.processor() or platform.machine() or "unknown CPU"
        if platform.system() == "Linux":
            notes.append("/proc/cpuinfo has no model name; used platform.processor()")
    if not flags and platform.system() == "Linux":
        notes.append("no CPU flags in /proc/cpuinfo")
    return DeviceInfo(
        device="cpu",
        backend="cpu",
        name=model,
        total_memory_bytes=_total_ram(),
        cpu_cores=_cpu_cores(),
        torch_threads=torch.get_num_threads(),
        cpu_flags=[f for f in MATMUL_CPU_FLAGS if f in flags],
        notes=notes,
    )


def _describe_cuda(device: torch.device) -> DeviceInfo:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    rocm = bool(torch.version.hip)
    notes: list[str] = []
    if rocm:
        driver, note = amdsmi_driver_version()
        capability = getattr(props, "gcnArchName", None) or None
    else:
        driver, note = nvml_driver_version()
        capability = f"{props.major}.{props.minor}"
    if note:
        notes.append(note)
    return DeviceInfo(
        device=f"cuda:{index}",
        backend="rocm" if rocm else "cuda",
        name=props.name,
        total_memory_bytes=int(props.total_memory),
        driver_version=driver,
        runtime_version=torch.version.hip if rocm else torch.version.cuda,
        compute_capability=capability,
        multiprocessors=getattr(props, "multi_processor_count", None),
        cpu_cores=_cpu_cores(),
        torch_threads=torch.get_num_threads(),
        notes=notes,
    )
