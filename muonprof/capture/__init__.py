"""Capture: train for real, record per-layer gradient and momentum spectra, and store them as an artifact."""

from .artifact import FORMAT, KINDS, CaptureRecord, LayerRecord, Spectra, SpectraError, load_spectra, save_spectra
from .recorder import SpectrumRecorder
from .run import (
    DEFAULT_WARMUP_STEPS,
    CaptureError,
    capture_spectra,
    capture_steps,
    check_window,
    matrix_parameters,
    plan_captures,
    spread_steps,
)
from .stats import rank_holding, spectrum_stats, stats_row
from .window import DEFAULT_WINDOW, MAX_WINDOW, WINDOW_BYTES, GradientWindow, select_window_layers

__all__ = [
    "DEFAULT_WARMUP_STEPS",
    "DEFAULT_WINDOW",
    "FORMAT",
    "KINDS",
    "MAX_WINDOW",
    "WINDOW_BYTES",
    "CaptureError",
    "CaptureRecord",
    "GradientWindow",
    "LayerRecord",
    "Spectra",
    "SpectraError",
    "SpectrumRecorder",
    "capture_spectra",
    "capture_steps",
    "check_window",
    "load_spectra",
    "matrix_parameters",
    "plan_captures",
    "rank_holding",
    "save_spectra",
    "select_window_layers",
    "spectrum_stats",
    "spread_steps",
    "stats_row",
]
