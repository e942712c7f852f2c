"""What the device is and what it can do: detection, live telemetry and measured matmul rates.

``muonprof device`` shows all three; bench embeds them in its artifacts so timings can be read against the
hardware (and against whether it was throttled while they were taken).
"""

from __future__ import annotations

from .detect import MATMUL_CPU_FLAGS, DeviceError, DeviceInfo, describe_device, resolve_device
from .probe import DTYPES, DeviceRates, MatmulResult, Timer, best_dtype, default_shapes, measure_matmul
from .telemetry import (
    AmdSmiTelemetry,
    CpuTelemetry,
    NvmlTelemetry,
    Telemetry,
    TelemetrySampler,
    TorchTelemetry,
    import_amdsmi,
    open_telemetry,
    summarize,
)

__all__ = [
    "DTYPES",
    "MATMUL_CPU_FLAGS",
    "AmdSmiTelemetry",
    "CpuTelemetry",
    "DeviceError",
    "DeviceInfo",
    "DeviceRates",
    "MatmulResult",
    "NvmlTelemetry",
    "Telemetry",
    "TelemetrySampler",
    "Timer",
    "TorchTelemetry",
    "best_dtype",
    "default_shapes",
    "describe_device",
    "import_amdsmi",
    "measure_matmul",
    "open_telemetry",
    "resolve_device",
    "summarize",
]
