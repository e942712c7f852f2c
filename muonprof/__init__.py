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
    "__version__",
    "load_profile",
    "orthogonalize",
    "save_profile",
]
