"""The bundled optimizer and its parameter routing."""

from .profiled_muon import ProfiledMuon
from .routing import route_module, route_named_parameters

__all__ = ["ProfiledMuon", "route_module", "route_named_parameters"]
