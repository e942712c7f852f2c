"""Training data that needs no download, in reproducible batches for the profiling and tuning runs.

Every batcher has the same contract: ``batch(step) -> (x, y)`` depends only on (seed, step), so batch k
is the same on every run and independent of drawing order (resuming, comparing optimizers), and
``val_batches(n)`` is a fixed list, the same for every seed so validation losses compare across runs.
"""

from .corpus import Corpus, DataError, load_corpus, step_generator
from .images import SHAPES, ImageBatches
from .text import TokenBatches
from .vectors import VectorBatches

__all__ = [
    "SHAPES",
    "Corpus",
    "DataError",
    "ImageBatches",
    "TokenBatches",
    "VectorBatches",
    "load_corpus",
    "step_generator",
]
