"""The JSON profile (format ``muonprof.profile/1``): schema, load/save, and resolution against a model."""

from __future__ import annotations

from typing import Any

from .io import (
    KIND,
    ProfileError,
    atomic_write_text,
    fingerprint,
    load_profile,
    parse_profile,
    profile_to_json,
    save_profile,
)
from .resolve import LayerPlan, resolve_layers
from .schema import (
    FORMAT,
    Ladder,
    LadderRung,
    LayerEntry,
    LayerSettings,
    Measured,
    ModelInfo,
    Profile,
    Provenance,
    has_ladders,
    without_ladders,
)

__all__ = [
    "FORMAT",
    "Ladder",
    "LadderRung",
    "LayerEntry",
    "LayerPlan",
    "LayerSettings",
    "Measured",
    "ModelInfo",
    "Profile",
    "ProfileError",
    "Provenance",
    "atomic_write_text",
    "fingerprint",
    "has_ladders",
    "json_schema",
    "load_profile",
    "parse_profile",
    "profile_to_json",
    "resolve_layers",
    "save_profile",
    "shipped_json_schema",
    "without_ladders",
]

SCHEMA_ID = KIND.json_schema()["$id"]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``muonprof.profile/1``, generated from the pydantic models."""
    return KIND.json_schema()


def shipped_json_schema() -> dict[str, Any]:
    """The schema file shipped inside the package (kept equal to ``json_schema()`` by a test)."""
    return KIND.shipped_json_schema()
