"""The versioned-artifact machinery (muonprof.artifacts) on a toy kind: tags, migrations in order, a migration
bug reported as such, newer and unknown formats, and one-line messages naming the field."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from muonprof.artifacts import (
    ArtifactKind,
    format_tag,
    get_kind,
    load_document,
    migrate,
    parse_format,
)


class ToyError(ValueError):
    pass


class ToyV1(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["muonprof.toy/1"]
    size: int = Field(ge=0)


class ToyV3(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["muonprof.toy/3"]
    sizes: list[int]
    unit: str


def toy_kind(*, buggy: bool = False) -> ArtifactKind:
    kind = ArtifactKind("toy", 3, ToyV3, ToyError, "toy file", "muonprof toy", "muonprof", models={1: ToyV1})

    @kind.migration(1)
    def one_to_two(doc: dict[str, Any]) -> dict[str, Any]:
        """toy/2 holds a list of sizes instead of one size."""
        if buggy:
            raise KeyError("sizes")
        doc["sizes"] = [doc.pop("size")]
        return doc

    @kind.migration(2)
    def two_to_three(doc: dict[str, Any]) -> dict[str, Any]:
        """toy/3 names the unit of the sizes (they were always bytes)."""
        doc["unit"] = "bytes"
        return doc

    return kind


def test_tags_parse_and_format() -> None:
    assert format_tag("bench", 2) == "muonprof.bench/2"
    assert parse_format("muonprof.bench/2") == ("bench", 2)
    for bad in ("muonprof.bench", "bench/2", "muonprof.bench/x", 2, None, "muonprof.bench/2 "):
        assert parse_format(bad) is None


def test_an_old_document_runs_every_migration_in_order_and_validates() -> None:
    kind = toy_kind()
    original = {"format": "muonprof.toy/1", "size": 7}
    model, doc = load_document(original, kind, "t.json")
    assert doc == {"format": "muonprof.toy/3", "sizes": [7], "unit": "bytes"}
    assert isinstance(model, ToyV3) and model.sizes == [7]
    assert original == {"format": "muonprof.toy/1", "size": 7}, "the caller's document is not modified"
    assert migrate({"format": "muonprof.toy/2", "sizes": [1]}, kind, "t")["unit"] == "bytes"
    assert kind.oldest == 1


def test_a_migration_bug_is_its_own_one_line_message_not_a_corrupt_file() -> None:
    with pytest.raises(ToyError) as info:
        load_document({"format": "muonprof.toy/1", "size": 7}, toy_kind(buggy=True), "t.json")
    message = str(info.value)
    assert message.startswith("t.json: migration toy/1->2 failed: KeyError") and "a bug in muonprof" in message
    assert "corrupt" not in message and "\n" not in message


def test_a_damaged_old_file_is_reported_as_damaged_before_its_migration_runs() -> None:
    with pytest.raises(ToyError, match=r"^t\.json: corrupt toy file: size: Input should be greater than or equal"):
        load_document({"format": "muonprof.toy/1", "size": -1}, toy_kind(buggy=True), "t.json")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format": "muonprof.toy/4"}, "t: format 'muonprof.toy/4' was written by a newer muonprof"),
        ({"format": "muonprof.toy/0"}, "t: format 'muonprof.toy/0' is not 'muonprof.toy/3' and is too old"),
        ({"format": "muonprof.bench/2"}, "t: format 'muonprof.bench/2' is a muonprof bench file, not a toy file"),
        ({"format": "toy"}, "t: format 'toy' is not a muonprof format"),
        ({"size": 1}, "t: not a muonprof toy file"),
        ([1, 2], "t: not a muonprof toy file"),
        ({"format": "muonprof.toy/3", "sizes": [1]}, "t: corrupt toy file: unit: Field required"),
        ({"format": "muonprof.toy/3", "sizes": ["x"], "unit": "b"}, "t: corrupt toy file: sizes[0]: Input should be"),
        ({"format": "muonprof.toy/3", "sizes": [], "unit": "b", "colour": 1}, "colour: Extra inputs"),
        ({"format": "muonprof.toy/3"}, "(+1 more)"),
    ],
)
def test_refusals_are_one_line_and_name_the_field(document: Any, message: str) -> None:
    with pytest.raises(ToyError) as info:
        load_document(document, toy_kind(), "t")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_migration_needs_a_docstring_and_registers_once() -> None:
    kind = toy_kind()
    with pytest.raises(ValueError, match="registered twice"):
        kind.migration(1)(lambda doc: doc)
    with pytest.raises(ValueError, match="needs a docstring"):
        kind.migration(7)(lambda doc: doc)


def test_unknown_kind_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"unknown artifact kind 'nope' \(known: bench, profile, spectra, validate\)"):
        get_kind("nope")
