"""Bench: the cost (on this device) and accuracy (on this model's spectra) of every orthogonalizer candidate.

``run_bench(spectra, device=..., grid=...)`` returns a ``BenchResult``; ``save_bench`` / ``load_bench``
write and read the ``muonprof.bench/2`` artifact (``bench/1`` files are upgraded on load). See DESIGN.md
("Two facts that make tuning cheap").
"""

from .accuracy import layer_accuracy, model_check, simulate_accuracy, spectral_accuracy
from .artifact import FORMAT, BenchError, BenchResult, load_bench, save_bench
from .candidates import BASELINE, GridError, GridSpec, build_candidates, candidate_label, parse_grid
from .cost import CostRecord, Timing, measure_costs, time_op
from .pareto import TARGET_ALIGNMENT, Point, pareto_front
from .run import derive, run_bench

__all__ = [
    "BASELINE",
    "FORMAT",
    "TARGET_ALIGNMENT",
    "BenchError",
    "BenchResult",
    "CostRecord",
    "GridError",
    "GridSpec",
    "Point",
    "Timing",
    "build_candidates",
    "candidate_label",
    "derive",
    "layer_accuracy",
    "load_bench",
    "measure_costs",
    "model_check",
    "pareto_front",
    "parse_grid",
    "run_bench",
    "save_bench",
    "simulate_accuracy",
    "spectral_accuracy",
    "time_op",
]
