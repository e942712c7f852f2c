"""muonprof: profile, tune and run the Muon family of optimizers per layer.

Importing the package is cheap and never imports the CLI, tuning or plotting code:
``from muonprof import ProfiledMuon`` in a training script pulls in torch, the orthogonalizers and
the profile schema only.
"""

from ._version import __version__
from .optim import ProfiledMuon
from .ortho import OrthoConfig, orthogonalize
from .profile import Profile, ProfileError, load_profile, save_profile

__all__ = [
    "OrthoConfig",
    "Profile",
    "ProfileError",
    "ProfiledMuon",
    "SpectrumRecorder",
    "__version__",
    "load_profile",
    "orthogonalize",
    "save_profile",
]


def __getattr__(name: str) -> object:
    """``SpectrumRecorder`` on first use: it pulls in the capture code, which a training script that only
    optimizes never needs."""
    if name == "SpectrumRecorder":
        from .capture.recorder import SpectrumRecorder

        return SpectrumRecorder
    raise AttributeError(f"module 'muonprof' has no attribute {name!r}")
