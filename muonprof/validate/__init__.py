"""``muonprof validate``: prove on real training whether a profile helps.

Races ``profile`` (ProfiledMuon with your profile) against ``default`` (ProfiledMuon's defaults = torch's
Muon algorithm), ``torch`` (torch.optim.Muon + AdamW) and ``adamw`` on the same init and the same batches,
at equal steps and at equal wall-clock, over one or more seeds, and judges each against a reference contender
by paired seeds (``muonprof.stats``), with steps- and time-to-target; see ``results`` for the rules.
"""

from __future__ import annotations

from .contenders import (
    CONTENDERS,
    DEFAULT_AGAINST,
    BuiltContender,
    ContenderError,
    ContenderSkipped,
    OptimizerGroup,
    adamw_lr_for,
    build_contender,
    parse_contenders,
)
from .distributed import DistributedRun, check_distributed, validate_distributed
from .results import (
    FORMAT,
    ContenderRuns,
    ResultsFormatError,
    ValidationResult,
    choose_reference,
    equal_wall_clock,
    load_results,
    save_results,
    summarize,
    verdict_line,
)
from .run import DEFAULT_STEPS, ProgressEvent, ValidationError, default_eval_every, validate

__all__ = [
    "CONTENDERS",
    "DEFAULT_AGAINST",
    "DEFAULT_STEPS",
    "FORMAT",
    "BuiltContender",
    "ContenderError",
    "ContenderRuns",
    "ContenderSkipped",
    "DistributedRun",
    "OptimizerGroup",
    "ProgressEvent",
    "ResultsFormatError",
    "ValidationError",
    "ValidationResult",
    "adamw_lr_for",
    "build_contender",
    "check_distributed",
    "choose_reference",
    "default_eval_every",
    "equal_wall_clock",
    "load_results",
    "parse_contenders",
    "save_results",
    "summarize",
    "validate",
    "validate_distributed",
    "verdict_line",
]
