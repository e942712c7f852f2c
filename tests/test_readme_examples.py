"""README's in-loop capture examples run as written (each in a fresh folder) and write their artifact."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from muonprof.capture import load_spectra

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


@pytest.mark.parametrize(
    ("name", "needs", "artifact"),
    [
        ("recorder", None, "run.spectra.pt"),
        ("hf", "accelerate", "hf.spectra.pt"),
        ("lightning", "lightning", "pl.spectra.pt"),
    ],
)
def test_readme_example_runs(
    name: str, needs: str | None, artifact: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if needs is not None:
        pytest.importorskip(needs)
    if name == "hf":
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(name), f"README:{name}", "exec"), {"__name__": "__readme__"})
    spectra = load_spectra(tmp_path / artifact)
    assert spectra.captures and spectra.layers
