"""Framework hooks: record spectra and hand ProfiledMuon to Hugging Face's Trainer and to Lightning.

Each submodule imports its framework lazily and says what to install when it is missing
(``pip install 'muonprof[hf]'`` / ``pip install 'muonprof[lightning]'``); muonprof itself never needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: pip install 'muonprof[{extra}]'") from None
