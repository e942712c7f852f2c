"""Capture: train for real, record per-layer gradient and momentum spectra, and store them as an artifact."""

from .artifact import FORMAT, KINDS, CaptureRecord, LayerRecord, Spectra, SpectraError, load_spectra, save_spectra
from .run import CaptureError, capture_spectra, capture_steps, matrix_parameters
from .stats import rank_holding, spectrum_stats, stats_row

__all__ = [
    "FORMAT",
    "KINDS",
    "CaptureError",
    "CaptureRecord",
    "LayerRecord",
    "Spectra",
    "SpectraError",
    "capture_spectra",
    "capture_steps",
    "load_spectra",
    "matrix_parameters",
    "rank_holding",
    "save_spectra",
    "spectrum_stats",
    "stats_row",
]
