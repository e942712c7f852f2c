"""The profile format: validation messages, atomic saves, the shipped JSON Schema, resolution rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from muonprof.optim.routing import route_module
from muonprof.profile import (
    ProfileError,
    json_schema,
    load_profile,
    resolve_layers,
    save_profile,
    shipped_json_schema,
)

FMT = "muonprof.profile/1"


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def resolve(profile: dict, strict: bool = True) -> dict:
    m = model()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    return resolve_layers(load_profile(profile), shapes, route_module(m), strict=strict)


def test_hand_written_minimal_profile_resolves_with_torch_defaults() -> None:
    plans = resolve({"format": FMT, "layers": {"2.weight": {"ns_steps": 3}}})
    assert plans["2.weight"].ortho.ns_steps == 3 and plans["2.weight"].ortho.coefficients == "jordan"
    assert plans["0.weight"].ortho.ns_steps == 5 and plans["0.weight"].ortho.dtype == "bfloat16"
    assert plans["0.weight"].lr_factor == pytest.approx(2**0.5)  # 32x16: sqrt(max(1, 32/16))
    assert plans["4.weight"].optimizer == "adamw" and plans["0.bias"].optimizer == "adamw"


def test_precedence_defaults_then_preset_then_layer_keys() -> None:
    plans = resolve(
        {
            "format": FMT,
            "defaults": {"dtype": "float32", "lr_rule": "match_rms_adamw"},
            "layers": {"2.weight": {"preset": "lowrank_he2025", "rank": 8, "full_below": 0, "lr_scale": 2.0}},
        }
    )
    low = plans["2.weight"]
    assert low.ortho.method == "lowrank" and low.ortho.rank == 8 and low.ortho.full_below == 0
    assert low.ortho.dtype == "bfloat16"  # the preset is a whole recipe: it overrides defaults
    assert low.lr_factor == pytest.approx(0.2 * 32**0.5 * 2.0)
    assert plans["0.weight"].ortho.dtype == "float32"


def test_defaults_optimizer_adamw_moves_every_unlisted_layer() -> None:
    plans = resolve({"format": FMT, "defaults": {"optimizer": "adamw"}, "layers": {"2.weight": {"optimizer": "muon"}}})
    assert plans["0.weight"].optimizer == "adamw" and plans["2.weight"].optimizer == "muon"


@pytest.mark.parametrize(
    ("document", "pattern"),
    [
        ({"layers": {}}, 'missing "format"'),
        ({"format": "muonprof.profile/2"}, "format: Input should be 'muonprof.profile/1'"),
        ({"format": FMT, "layers": {"2.weight": {"method": "qr"}}}, r'layers\["2\.weight"\]\.method'),
        (
            {"format": FMT, "layers": {"2.weight": {"rank": -4}}},
            r'layers\["2\.weight"\]\.rank: Input should be greater than 0',
        ),
        (
            {"format": FMT, "layers": {"2.weight": {"ns_stepz": 3}}},
            r'layers\["2\.weight"\]\.ns_stepz: Extra inputs',
        ),
        (
            {"format": FMT, "defaults": {"coefficients": "bogus"}},
            "defaults.coefficients: unknown coefficient schedule",
        ),
        ({"format": FMT, "defaults": {"coefficients": [[1.0]]}}, "defaults.coefficients"),
        ({"format": FMT, "layers": {"x": {"lr_scale": 0}}}, r'layers\["x"\]\.lr_scale'),
        ({"format": FMT, "layers": {"x": {"preset": "fast"}}}, "unknown preset 'fast'"),
        ({"format": FMT, "extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_invalid_documents_name_the_key_and_layer(document: dict, pattern: str) -> None:
    with pytest.raises(ProfileError, match=pattern):
        load_profile(document)


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [
        ({"2.weight": {"method": "lowrank"}}, r'layers\["2\.weight"\].*rank: method .lowrank. needs a rank'),
        ({"2.weight": {"method": "rsvd", "rank": 33}}, r"rank: 33 exceeds min\(m, n\) = 32"),
        ({"0.bias": {"optimizer": "muon"}}, r"optimizer muon needs a matrix, '0\.bias' has shape \(32,\)"),
        ({"h.9.weight": {}}, r'layers\["h\.9\.weight"\]: no parameter of that name'),
        ({"2.weight": {"shape": [64, 32]}}, r"profile has shape \(64, 32\), model has \(32, 32\)"),
    ],
)
def test_problems_against_the_model_name_the_layer(layers: dict, pattern: str) -> None:
    with pytest.raises(ProfileError, match=pattern):
        resolve({"format": FMT, "layers": layers})


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ProfileError) as info:
        resolve({"format": FMT, "layers": {"nope": {}, "2.weight": {"method": "lowrank", "rank": 99}}})
    assert "nope" in str(info.value) and "rank: 99" in str(info.value)


def test_load_reports_malformed_json_with_position(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"format": "muonprof.profile/1",\n "layers": {,}}')
    with pytest.raises(ProfileError, match=r"not valid JSON: .* line 2, column"):
        load_profile(path)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="must be a JSON object"):
        load_profile(path)


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profile.json"
    doc = {
        "format": FMT,
        "model": {"name": "mlp", "fingerprint": "sha256:0123456789abcdef"},
        "defaults": {"dtype": "float32"},
        "layers": {
            "2.weight": {
                "method": "lowrank",
                "rank": 8,
                "coefficients": [[3.0, -3.2, 1.2], [1.5, -0.5]],
                "measured": {"time_ms": 0.5, "alignment": 0.97, "source": "spectral model"},
            }
        },
    }
    save_profile(doc, path)
    loaded = load_profile(path)
    assert loaded.layers["2.weight"].measured.alignment == 0.97
    save_profile(loaded, path)
    assert load_profile(path) == loaded
    before = path.read_text()
    with pytest.raises(ProfileError):
        save_profile({"format": FMT, "layers": {"x": {"rank": 0}}}, path)
    assert path.read_text() == before  # the invalid profile never reached the disk
    assert sorted(p.name for p in path.parent.iterdir()) == ["profile.json"]  # no temp files left


def test_shipped_schema_is_current_and_describes_the_hand_written_keys() -> None:
    assert shipped_json_schema() == json_schema(), (
        "run: muonprof profile schema --out muonprof/profile/profile.schema.json"
    )
    layer = json_schema()["$defs"]["LayerEntry"]["properties"]
    for key in (
        "optimizer",
        "method",
        "ns_steps",
        "coefficients",
        "rank",
        "range_finder",
        "power_iters",
        "oversample",
        "dtype",
        "lr_rule",
        "lr_scale",
    ):
        assert key in layer, key
    assert json.loads(json.dumps(json_schema()))["properties"]["format"]["const"] == FMT
