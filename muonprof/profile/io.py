"""Reading and writing profiles: validation errors that name the key and the layer, atomic saves."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._files import MAX_JSON_DEPTH, atomic_write, dumps_json, json_depth, loads_json
from ..artifacts import ArtifactKind, register
from .schema import Profile


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file, the key and the layer at fault."""


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    """('layers', 'h.0.weight', 'rank') -> layers["h.0.weight"].rank; list indices as [i]; any other key that
    is not an identifier (a layer name in a bench file's accuracy table) quoted the same way."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if parts and isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif parts and (loc[i - 1] == "layers" or not _IDENTIFIER.fullmatch(str(item))):
            parts[-1] += f'["{item}"]'  # a layer (parameter) name, or any key a dotted path would garble
        else:
            parts.append(str(item))
    return ".".join(parts) or "(document)"


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        # Drop pydantic's union-branch noise (e.g. "coefficients.str" vs "coefficients.list[...]").
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list"))))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {_loc_to_path(loc)}: {msg}")
    # Keep each distinct message once, in order.
    return "\n".join(dict.fromkeys(lines))


def parse_profile(data: Mapping[str, Any] | Profile, where: str = "profile") -> Profile:
    if isinstance(data, Profile):
        return data
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: a profile must be a JSON object, got {type(data).__name__}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ProfileError(f"{where}: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        return Profile.model_validate(dict(data))
    except ValidationError as err:
        raise ProfileError(format_validation_error(err, where)) from None


def load_profile(source: str | os.PathLike[str] | Mapping[str, Any] | Profile) -> Profile:
    """A validated profile from a path, a parsed JSON dict, or a Profile (returned as is)."""
    if isinstance(source, (Profile, Mapping)):
        return parse_profile(source)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"profile must be None, a path (str or os.PathLike), a dict or a Profile, got {type(source).__name__}"
        )
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ProfileError(f"{path}: cannot read profile ({err.__class__.__name__})") from None
    return parse_profile(loads_json(text, where=str(path), error=ProfileError), str(path))


def profile_to_json(profile: Profile) -> str:
    document = profile.model_dump(mode="json", exclude_none=True)
    return dumps_json(document, what="profile", error=ProfileError, indent=2) + "\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write via a temp file in the same directory and rename: readers see the old or the new file, never half."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def save_profile(profile: Profile | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate and write ``profile`` atomically; an invalid profile never reaches the disk."""
    validated = parse_profile(profile)
    return atomic_write_text(path, profile_to_json(validated))


def fingerprint(named_shapes: Iterable[tuple[str, Iterable[int]]]) -> str:
    """A stable identity of a model's parameters: sha256 of sorted 'name:shape' lines (16 hex digits)."""
    lines = sorted(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in named_shapes)
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


KIND = register(
    ArtifactKind(
        name="profile",
        version=1,
        model=Profile,
        error=ProfileError,
        what="profile",
        rerun="muonprof tune",
        schema_package="muonprof.profile",
    )
)
"""The profile as an artifact kind: its schema for ``muonprof schema profile``. Profiles keep their own
loader (``load_profile``), whose messages name layers; there is one version, so no migration yet."""
