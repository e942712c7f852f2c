"""The command line as a user meets it: version, help, profile check/schema, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from muonprof import __version__
from muonprof.cli import app

runner = CliRunner()
FMT = "muonprof.profile/1"


def write(tmp_path: Path, doc: dict | str) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "profile" in result.output


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "muonprof", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and __version__ in done.stdout


def test_profile_check_valid_file_against_a_model(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"format": FMT, "layers": {"2.weight": {"method": "lowrank", "rank": 16, "dtype": "float32"}}},
    )
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mlp"])
    assert result.exit_code == 0, result.output
    assert "lowrank-r16" in result.output
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mlp", "--json"])
    data = json.loads(result.stdout)
    assert data["valid"] is True
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["2.weight"]["source"] == "profile" and rows["6.weight"]["optimizer"] == "adamw"


def test_profile_check_shows_limuon_momentum_and_the_state_it_keeps(tmp_path: Path) -> None:
    layers = {"2.weight": {"momentum_rank": 8}, "4.weight": {"momentum": "storm"}}
    path = write(tmp_path, {"format": FMT, "layers": layers})
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mlp", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["2.weight"]["momentum"] == "ema, rank 8" and rows["4.weight"]["momentum"] == "storm"
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mlp"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "momentum" in result.output and "optimizer state (fp32): Muon" in result.output
    assert "optimizer.step(closure)" in result.output


def test_profile_check_errors_are_one_line_each_without_traceback(tmp_path: Path) -> None:
    cases = [
        ("{not json", "not valid JSON"),
        (
            json.dumps({"format": FMT, "layers": {"2.weight": {"method": "magic"}}}),
            'layers["2.weight"].method',
        ),
    ]
    for text, expected in cases:
        result = runner.invoke(app, ["profile", "check", str(write(tmp_path, text))])
        assert result.exit_code == 1
        assert expected in result.output and "Traceback" not in result.output
    path = write(tmp_path, {"format": FMT, "layers": {"2.weight": {"method": "rsvd", "rank": 999}, "zzz": {}}})
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mlp"])
    assert result.exit_code == 1
    assert "zzz" in result.output and "rank: 999 exceeds" in result.output
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "no.such.module:make"])
    assert result.exit_code == 2 and "cannot import" in result.output
    result = runner.invoke(app, ["profile", "check", str(tmp_path / "absent.json")])
    assert result.exit_code == 1 and "no such profile file" in result.output
    result = runner.invoke(app, ["profile", "check", str(path), "--json"])
    assert result.exit_code == 0  # schema-valid; model problems need --model


def test_profile_schema_command_writes_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    result = runner.invoke(app, ["profile", "schema", "--out", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text())["properties"]["format"]["const"] == FMT


def test_user_factory_model_spec(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, {"format": FMT, "layers": {"0.weight": {"ns_steps": 2}}})
    result = runner.invoke(app, ["profile", "check", str(path), "--model", "mymodels:build", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["fingerprint"].startswith("sha256:")
