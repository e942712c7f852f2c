"""Every profile shipped in profiles/ validates against the current schema and fits its built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muonprof.models import BUILTINS, load_model
from muonprof.optim.routing import route_module
from muonprof.profile import fingerprint, load_profile, resolve_layers

BUNDLED = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "profiles").glob("*.json") if not p.name.endswith(".bench.json")
)


def test_profiles_are_bundled() -> None:
    names = {p.name for p in BUNDLED}
    assert {"gpt2-tiny.cpu.json", "llama-20m.cpu.json", "vit-tiny.cpu.json"} <= names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_proved_itself_in_the_race(path: Path) -> None:
    """Nothing ships unproven: the profile records tune's race, and what it ships either passed it (non-inferior
    to the default at equal steps over paired seeds) or is the default recipe (the fallback)."""
    profile = load_profile(path)
    race = (profile.provenance.model_dump() if profile.provenance else {}).get("race")
    assert race is not None, "a bundled profile comes from a tune run with its race"
    assert race["seeds"] and len(race["seeds"]) >= 3
    winner = next(row for row in race["table"] if row["name"] == race["winner"])
    if race["fallback"]:
        assert race["winner"] == "default"
    else:
        assert winner["verdict"] in ("better", "non-inferior") and winner["bound"] < race["options"]["margin"]
        assert winner["measured_speedup"] > 1
        # and the verdict held at a longer horizon than the race chose on (tune's confirmation)
        assert race["options"].get("confirm_steps"), "a shipped recipe was confirmed at a longer horizon"
        assert winner["confirm_verdict"] in ("better", "non-inferior")
        assert winner["confirm_bound"] < race["options"]["margin"]


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_matches_its_model(path: Path) -> None:
    profile = load_profile(path)
    assert profile.model is not None and profile.model.name in BUILTINS
    assert profile.provenance is not None and profile.provenance.command
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = load_model(profile.model.name)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert profile.model.fingerprint == fingerprint(shapes.items())
    plans = resolve_layers(profile, shapes, route_module(model), strict=True)
    tuned = [name for name in profile.layers if plans[name].optimizer == "muon"]
    assert tuned, "a bundled profile tunes at least one Muon layer"
    for name in tuned:
        entry = profile.layers[name]
        assert entry.measured is not None and entry.measured.time_ms is not None
