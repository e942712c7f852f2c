"""Versioned artifact formats: the ``muonprof.KIND/N`` tag, explicit migrations, one loader for every kind.

Every file muonprof writes (profile, spectra, bench, validate results) starts with ``"format":
"muonprof.KIND/N"``. When the shape of a kind's document changes, N goes up and the old shape is upgraded by
an explicit **migration** ``N -> N+1``: a function on the parsed document (a dict) whose docstring says what
changed. Reading a file then always takes the same path (``load_document``):

1. parse the tag: not a muonprof tag, another kind, a version newer than this muonprof knows ("written by a
   newer muonprof") or older than its oldest migration are each one line naming the file;
2. for each version from the file's up to the current one: validate the document with that version's model
   (when one is kept), then run that version's migration. A migration that raises is a bug in muonprof, not a
   damaged file, and is reported as ``migration KIND/N->N+1 failed: ...``;
3. validate the result with the current pydantic model; the first problem is one line naming the file and
   the field (``profile.io.format_validation_error`` spells the field).

Why validate *before* a migration: a migration may then trust the structure it reads (no defensive code,
no broad ``except`` that would turn its own bug into "corrupt file"), and a damaged old file is still
reported as damaged, naming its field, rather than as a migration bug.

The models are gates and schemas; the artifact classes (``BenchResult``, ``Spectra``, ``ValidationResult``)
keep their own in-memory form and are built from the migrated dict, so a round trip is lossless.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

PREFIX = "muonprof."
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_TAG = re.compile(r"muonprof\.([a-z][a-z0-9_]*)/([0-9]+)")

Migration = Callable[[dict[str, Any]], dict[str, Any]]
"""Upgrades a parsed document of version N to version N+1 (the loader sets the new ``format`` tag)."""

MODULES = {
    "profile": "muonprof.profile.io",
    "spectra": "muonprof.capture.artifact",
    "bench": "muonprof.bench.artifact",
    "validate": "muonprof.validate.results",
}
"""Where each kind is declared (imported on demand by ``get_kind``, so naming a kind costs no import)."""


def format_tag(kind: str, version: int) -> str:
    """``("bench", 2)`` -> ``"muonprof.bench/2"``."""
    return f"{PREFIX}{kind}/{version}"


def parse_format(tag: Any) -> tuple[str, int] | None:
    """``"muonprof.bench/2"`` -> ``("bench", 2)``; None for anything that is not such a tag."""
    if not isinstance(tag, str):
        return None
    match = _TAG.fullmatch(tag)
    return (match.group(1), int(match.group(2))) if match else None


@dataclass
class ArtifactKind:
    """One kind of artifact: its current version, the model that validates it, its error class and migrations.

    ``models`` may keep the model of an older version N: the loader validates a /N document with it before
    running migration N -> N+1 (see the module docstring). ``view`` picks the JSON-able part of a document
    for the models (the spectra file also holds tensors, which no JSON Schema describes).
    """

    name: str
    version: int
    model: type[BaseModel]
    error: type[ValueError]
    what: str  # "bench file": how messages name a document of this kind
    rerun: str  # the command that writes a current one, for "re-run ..." advice
    schema_package: str  # the package the shipped ``<name>.schema.json`` sits in
    migrations: dict[int, Migration] = field(default_factory=dict)
    models: dict[int, type[BaseModel]] = field(default_factory=dict)
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def format(self) -> str:
        return format_tag(self.name, self.version)

    @property
    def oldest(self) -> int:
        """The oldest version this muonprof can still read (an unbroken chain of migrations up to current)."""
        n = self.version
        while n - 1 in self.migrations:
            n -= 1
        return n

    @property
    def schema_file(self) -> str:
        return f"{self.name}.schema.json"

    def migration(self, from_version: int) -> Callable[[Migration], Migration]:
        """Decorator: register ``fn`` as the migration ``from_version -> from_version + 1``."""

        def register(fn: Migration) -> Migration:
            if from_version in self.migrations:
                raise ValueError(f"{self.name}: migration {from_version}->{from_version + 1} registered twice")
            if not fn.__doc__:
                raise ValueError(f"{self.name}: migration {from_version}->{from_version + 1} needs a docstring")
            self.migrations[from_version] = fn
            return fn

        return register

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the current version, generated from the model."""
        schema_id = f"https://muonprof.dev/schema/{self.name}-{self.version}.json"
        return {"$schema": SCHEMA_DIALECT, "$id": schema_id, **self.model.model_json_schema()}

    def shipped_json_schema(self) -> dict[str, Any]:
        """The schema file shipped in the package (a test keeps it equal to ``json_schema()``)."""
        text = resources.files(self.schema_package).joinpath(self.schema_file).read_text(encoding="utf-8")
        return json.loads(text)


_KINDS: dict[str, ArtifactKind] = {}


def register(kind: ArtifactKind) -> ArtifactKind:
    """Declare a kind (once, at import of the module that owns it)."""
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"artifact kind {kind.name!r} declared twice")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ArtifactKind:
    """The declared kind ``name``; a ValueError naming the known ones for any other."""
    if name not in MODULES:
        raise ValueError(f"unknown artifact kind {name!r} (known: {', '.join(sorted(MODULES))})")
    if name not in _KINDS:
        importlib.import_module(MODULES[name])
    return _KINDS[name]


def one_line(err: ValidationError, where: str) -> str:
    """The first problem pydantic found, naming the field, plus how many more there are: one line."""
    from .profile.io import format_validation_error

    lines = format_validation_error(err, where).splitlines()
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0] + more


def check_format(data: Any, kind: ArtifactKind, where: str) -> int:
    """The version of ``data``'s format tag, or ``kind.error`` saying in one line why it cannot be read."""
    if not isinstance(data, Mapping) or "format" not in data:
        raise kind.error(f"{where}: not a muonprof {kind.what}")
    tag = data["format"]
    parsed = parse_format(tag)
    if parsed is None:
        raise kind.error(f"{where}: format {tag!r} is not a muonprof format (expected {kind.format!r})")
    name, version = parsed
    if name != kind.name:
        raise kind.error(f"{where}: format {tag!r} is a muonprof {name} file, not a {kind.what}")
    if version > kind.version:
        raise kind.error(
            f"{where}: format {tag!r} was written by a newer muonprof (this version reads up to "
            f"{kind.format!r}); upgrade muonprof"
        )
    if version < kind.oldest:
        raise kind.error(
            f"{where}: format {tag!r} is not {kind.format!r} and is too old to upgrade (oldest readable: "
            f"{format_tag(kind.name, kind.oldest)!r}); re-run `{kind.rerun}` with this version"
        )
    return version


def validate(data: Mapping[str, Any], model: type[BaseModel], kind: ArtifactKind, where: str) -> BaseModel:
    """``model`` validated from ``data`` (through ``kind.view``); a ``kind.error`` naming file and field."""
    document = kind.view(dict(data)) if kind.view is not None else dict(data)
    try:
        return model.model_validate(document)
    except ValidationError as err:
        raise kind.error(one_line(err, f"{where}: corrupt {kind.what}")) from None


def migrate(data: Mapping[str, Any], kind: ArtifactKind, where: str) -> dict[str, Any]:
    """``data`` upgraded to ``kind``'s current version (a copy; ``data`` is left as it was).

    Each older version's model (when kept) checks the document before its migration runs; the migration's
    own exceptions are reported as a bug in that migration, never as a damaged file.
    """
    version = check_format(data, kind, where)
    document = dict(data)
    for n in range(version, kind.version):
        if n in kind.models:
            validate(document, kind.models[n], kind, where)
        step = kind.migrations[n]
        try:
            document = step(copy.deepcopy(document))
        except Exception as err:  # deliberate: whatever a migration raises on a validated input is its bug
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise kind.error(
                f"{where}: migration {kind.name}/{n}->{n + 1} failed: {type(err).__name__}"
                + (f": {detail}" if detail else "")
                + " (a bug in muonprof, not a damaged file; please report it)"
            ) from err
        if not isinstance(document, dict):
            raise kind.error(
                f"{where}: migration {kind.name}/{n}->{n + 1} failed: returned {type(document).__name__}, "
                "not a document (a bug in muonprof, not a damaged file; please report it)"
            )
        document["format"] = format_tag(kind.name, n + 1)
    return document


def load_document(data: Any, kind: ArtifactKind, where: str) -> tuple[BaseModel, dict[str, Any]]:
    """Parse the tag, migrate to the current version and validate: (the model, the migrated document)."""
    document = migrate(data, kind, where)
    return validate(document, kind.model, kind, where), document


def check_document(data: Mapping[str, Any], kind: ArtifactKind, what: str) -> BaseModel:
    """Validate a document about to be written with the current model: a writer that produces an invalid
    file is refused before the file reaches the disk (one line naming the field)."""
    document = kind.view(dict(data)) if kind.view is not None else dict(data)
    try:
        return kind.model.model_validate(document)
    except ValidationError as err:
        raise kind.error(one_line(err, f"{what}: cannot write an invalid {kind.what}")) from None


__all__ = [
    "MODULES",
    "ArtifactKind",
    "Migration",
    "OpenModel",
    "StrictModel",
    "check_document",
    "check_format",
    "format_tag",
    "get_kind",
    "load_document",
    "migrate",
    "one_line",
    "parse_format",
    "register",
    "validate",
]


# Bases of the artifact models (the profile's own models keep theirs in profile.schema).


class StrictModel(BaseModel):
    """A part of an artifact whose keys are all known: an unknown key is a typo or a newer file (refused),
    and, since artifacts are strict JSON, no number may be NaN or infinite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OpenModel(BaseModel):
    """A part whose known keys are typed but which may carry more (measures and notes that grow with
    muonprof without changing the shape of the file)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
