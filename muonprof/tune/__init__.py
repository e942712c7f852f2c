"""Tune: Optuna picks each layer's orthogonalizer (stage 1, from bench data) and the LR scaling (stage 2)."""

from .run import Stage1Result, Stage2Result, default_study_name, momentum_weights, tune_stage1, tune_stage2
from .space import LayerMenu, Option, TuneError, build_menus
from .stage1 import Assignment
from .study import default_storage, open_study
from .writer import build_profile, settings_of

__all__ = [
    "Assignment",
    "LayerMenu",
    "Option",
    "Stage1Result",
    "Stage2Result",
    "TuneError",
    "build_menus",
    "build_profile",
    "default_storage",
    "default_study_name",
    "momentum_weights",
    "open_study",
    "settings_of",
    "tune_stage1",
    "tune_stage2",
]
