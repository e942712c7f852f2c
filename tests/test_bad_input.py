"""Bad input, every command: a non-zero exit, ONE line naming the problem, no traceback, nothing on disk touched.

Each CLI case runs in a folder holding a small fixture set (a valid profile, spectra and bench files, and broken
variants of each); the folder is hashed (names and bytes) before and after, so a case that writes, creates a
folder or truncates a file fails. The cases fail before any training, so the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from muonprof import ProfiledMuon
from muonprof._files import dumps_json, loads_json
from muonprof.capture import CaptureRecord, LayerRecord, Spectra, save_spectra
from muonprof.cli import app
from muonprof.console import console, err_console, fail
from muonprof.profile import ProfileError, load_profile

runner = CliRunner()

PROFILE = {"format": "muonprof.profile/1", "layers": {"net.0.weight": {"ns_steps": 5}}}
DEEP = "[" * 100_000 + "]" * 100_000


def _spectra(values: torch.Tensor) -> Spectra:
    layer = LayerRecord("a.weight", (4, 3), (4, 3), "mlp_up", "muon")
    capture = CaptureRecord(step=1, loss=1.0, grad={"a.weight": values}, momentum={"a.weight": values})
    return Spectra(meta={"fingerprint": "abc", "model": {"spec": "tiny"}}, layers=[layer], captures=[capture])


def _bench(time_s: dict[str, Any]) -> str:
    cost = {"shape": [4, 3], "label": "svd", "config": {}, "count": 1, "batch": 1, "time_s": time_s}
    return json.dumps({"format": "muonprof.bench/1", "meta": {}, "layers": [], "costs": [cost], "accuracy": {}})


@pytest.fixture
def fixtures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fixture folder (also the working directory, so default output names land in it)."""
    folder = tmp_path / "fx"
    folder.mkdir()
    (folder / "ok.profile.json").write_text(json.dumps(PROFILE))
    nan_profile = {**PROFILE, "layers": {"net.0.weight": {"measured": {"time_ms": float("nan")}}}}
    (folder / "nan.profile.json").write_text(json.dumps(nan_profile))  # json.dumps writes the NaN literal
    inf = {**PROFILE, "layers": {"net.0.weight": {"measured": {"time_ms": float("inf")}}}}
    (folder / "inf.profile.json").write_text(json.dumps(inf))
    (folder / "deep.json").write_text(DEEP)
    (folder / "list.json").write_text("[1, 2]")
    (folder / "broken.json").write_text('{"format": ')
    (folder / "unknown.profile.json").write_text(json.dumps({**PROFILE, "colour": "blue"}))
    big = {**PROFILE, "layers": {"net.0.weight": {"lr_scale": 1e308}}}
    (folder / "big.profile.json").write_text(json.dumps(big))
    save_spectra(_spectra(torch.tensor([1.0, float("nan"), 0.5])), folder / "nan.spectra.pt")
    save_spectra(_spectra(torch.tensor([1.0, -0.5, 0.25])), folder / "neg.spectra.pt")
    (folder / "nan.bench.json").write_text(_bench({"median_s": float("nan")}))
    (folder / "neg.bench.json").write_text(_bench({"median_s": -1.0}))
    (folder / "nan.results.json").write_text('{"format": "muonprof.validate/1", "meta": {"x": NaN}}')
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with the sha256 of its bytes ('dir' for folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# (argv, a piece of the one error line). Paths are relative to the fixture folder.
CLI_CASES: list[tuple[list[str], str]] = [
    # profile check
    (["profile", "check", "absent.json"], "absent.json: no such profile file"),
    (["profile", "check", "x[/x].json"], "x[/x].json: no such profile file"),
    (["profile", "check", "[bold]b.json"], "[bold]b.json: no such profile file"),
    (["profile", "check", ":smile:.json"], ":smile:.json: no such profile file"),
    (["profile", "check", "nan.profile.json"], "net.0.weight.measured.time_ms = NaN"),
    (["profile", "check", "inf.profile.json"], "time_ms = Infinity"),
    (["profile", "check", "deep.json"], "nested too deeply"),
    (["profile", "check", "list.json"], "must be a JSON object"),
    (["profile", "check", "broken.json"], "not valid JSON"),
    (["profile", "check", "unknown.profile.json"], "colour"),
    (["profile", "check", "big.profile.json"], 'layers["net.0.weight"].lr_scale'),
    (["profile", "check", "sub"], "cannot read profile"),
    (["profile", "check", "ok.profile.json", "--model", "no.such.module:make"], "no.such.module"),
    (["profile", "check", "ok.profile.json", "--model", "[bold]nope[/]"], "[bold]nope[/]"),
    (["profile", "check", "nan.profile.json", "--model", "mlp"], "NaN"),
    # profile show
    (["profile", "show", "absent.json"], "no such profile file"),
    (["profile", "show", "nan.profile.json"], "NaN"),
    (["profile", "show", "deep.json"], "nested too deeply"),
    (["profile", "show", "big.profile.json"], "lr_scale"),
    # profile schema
    (["profile", "schema", "--out", "sub"], "is a directory"),
    (["profile", "schema", "--out", "/proc/muonprof-schema.json"], "/proc/muonprof-schema.json"),
    # spectrum: options fail before the model is built
    (["spectrum", "mlp", "--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),
    (["spectrum", "mlp", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["spectrum", "mlp", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["spectrum", "mlp", "--steps", "0"], "--steps must be at least 1"),
    (["spectrum", "mlp", "--every", "0"], "--every must be at least 1"),
    (["spectrum", "mlp", "--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["spectrum", "mlp", "--captures", "0"], "--captures must be at least 1"),
    (["spectrum", "mlp", "--window", "-1"], "--window must be at least 0"),
    (["spectrum", "mlp", "--window-mb", "0"], "--window-mb must be a finite number > 0"),
    (["spectrum", "mlp", "--window-mb", "nan"], "--window-mb must be a finite number > 0"),
    (["spectrum", "mlp", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["spectrum", "mlp", "--seq-len", "0"], "--seq-len must be at least 1"),
    (["spectrum", "mlp", "--seed", "-1"], "--seed must be an integer >= 0 and <= 9223372036854775807"),
    (["spectrum", "no.such.module:make", "--steps", "1"], "no.such.module"),
    (["spectrum", "hf:/nonexistent/[/x]", "--steps", "1"], "/nonexistent/[/x]"),
    (["spectrum", "mlp", "--steps", "1", "--device", "cuda:-1"], "cuda:-1"),
    (["spectrum", "mlp", "--steps", "1", "--device", ":smile:"], ":smile:"),
    # bench
    (["bench", "nan.spectra.pt"], "singular values must be finite and >= 0"),
    (["bench", "neg.spectra.pt"], "singular values must be finite and >= 0"),
    (["bench", "mlp", "--capture-steps", "0"], "--capture-steps must be at least 1"),
    (["bench", "nan.spectra.pt", "--seeds", "0"], "--seeds must be at least 1"),
    (["bench", "nan.spectra.pt", "--device", "cuda:-1"], "cuda:-1"),
    # tune: option checks and artifact checks, before any training
    (["tune", "mlp", "--min-layer-alignment", "1.5"], "--min-layer-alignment must be a finite number >= 0 and <= 1"),
    (["tune", "mlp", "--min-layer-alignment", "-1"], "--min-layer-alignment must be"),
    (["tune", "mlp", "--min-layer-alignment", "nan"], "--min-layer-alignment must be"),
    (["tune", "mlp", "--capture-steps", "0"], "--capture-steps must be at least 1"),
    (["tune", "mlp", "--trials", "0"], "--trials must be at least 1"),
    (["tune", "mlp", "--lr-trials", "-1"], "--lr-trials must be at least 0"),
    (["tune", "mlp", "--target-alignment", "0"], "--target-alignment must be a finite number > 0 and <= 1"),
    (["tune", "mlp", "--target-alignment", "1.5"], "--target-alignment must be"),
    (["tune", "mlp", "--time-budget-ms", "-5"], "--time-budget-ms must be a finite number > 0"),
    (["tune", "mlp", "--race-seeds", "0"], "--race-seeds must be at least 1"),
    (["tune", "mlp", "--race-steps", "0"], "--race-steps must be at least 1"),
    (["tune", "mlp", "--min-speedup", "0"], "--min-speedup must be a finite number > 0"),
    (["tune", "mlp", "--max-loss-increase", "nan"], "--max-loss-increase must be a finite number >= 0"),
    (["tune", "mlp", "--storage", "journal:/nonexistent-muonprof/x.log"], "/nonexistent-muonprof does not exist"),
    (["tune", "nan.spectra.pt", "--out", "new/p.json"], "singular values must be finite and >= 0"),
    (["tune", "mlp", "--bench", "nan.bench.json", "--out", "new/p.json"], "costs[0].time_s.median_s = NaN"),
    (["tune", "mlp", "--bench", "neg.bench.json", "--out", "new/p.json"], "costs[0] (svd).time_s.median_s = -1.0"),
    (["tune", "mlp", "--bench", "deep.json", "--out", "new/p.json"], "nested too deeply"),
    (["tune", "mlp", "--device", "cuda:-1", "--out", "new/p.json"], "cuda:-1"),
    # validate
    (["validate", "mlp", "--steps", "0"], "--steps must be at least 1"),
    (["validate", "mlp", "--seeds", "0"], "--seeds must be at least 1"),
    (["validate", "mlp", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["validate", "mlp", "--adamw-lr", "-1"], "--adamw-lr must be a finite number > 0"),
    (["validate", "mlp", "--baseline-lr", "inf"], "--baseline-lr must be a finite number > 0"),
    (["validate", "mlp", "--nproc", "0"], "--nproc must be at least 1"),
    (["validate", "mlp", "--time-budget", "0"], "--time-budget must be a finite number > 0"),
    (["validate", "mlp", "--eval-every", "0"], "--eval-every must be at least 1"),
    (["validate", "mlp", "--profile", "nan.profile.json", "--out", "new/r.json"], "NaN"),
    (["validate", "mlp", "--profile", "x[/x].json", "--out", "new/r.json"], "x[/x].json"),
    (["validate", "--from", "nan.results.json"], "NaN"),
    # usage errors Typer would draw as a six-line box: one line naming the command, the problem and --help
    (["tune", "mlp", "--trials", "abc"], "muonprof tune: Invalid value for '--trials'"),
    (["bench", "--bogus"], "muonprof bench: No such option: --bogus"),
    (["nosuch"], "muonprof: No such command 'nosuch'."),
    (["profile", "show"], "muonprof profile show: Missing argument 'file'. (see 'muonprof profile show --help')"),
    (["validate", "mlp", "--seeds", "[bold]x"], "Invalid value for '--seeds'"),
    # device
    (["device", "--device", "cuda:-1", "--no-probe"], "cuda:-1"),
    (["device", "--device", "[/x]", "--no-probe"], "[/x]"),
]


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_touches_nothing(fixtures: Path, argv: list[str], expected: str) -> None:
    before = snapshot(fixtures)
    result = runner.invoke(app, argv, env={"COLUMNS": "300"})
    output = result.output
    assert result.exit_code != 0, output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ") and expected in lines[0], output
    assert snapshot(fixtures) == before


# ------------------------------------------------------------------------------ the console prints literally


@pytest.mark.parametrize("text", ["a [/x] b", "[bold]loud[/bold]", ":smile: cuda:-1", "pip install 'muonprof[hf]'"])
def test_consoles_print_user_text_literally(text: str) -> None:
    for shown in (console, err_console):
        with shown.capture() as captured:
            shown.print(text)
        assert captured.get().strip() == text


def test_fail_prints_one_literal_line_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    with pytest.raises(typer.Exit) as info:
        fail("model 'x' needs the [hf] extra: pip install 'muonprof[hf]'", 2)
    assert info.value.exit_code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model 'x' needs the [hf] extra: pip install 'muonprof[hf]'"


# ------------------------------------------------------------------------------------------ strict JSON


def test_strict_json_writer_names_the_field_and_writes_nothing(tmp_path: Path) -> None:
    from muonprof._files import write_json

    with pytest.raises(ValueError, match=r"a\.b\[1\] = inf is not a finite number"):
        dumps_json({"a": {"b": [1.0, math.inf]}}, what="doc")
    target = tmp_path / "out" / "x.json"
    with pytest.raises(ValueError, match=r"x\.json"):
        write_json(target, {"t": math.nan}, what=str(target))
    assert not target.exists()
    assert loads_json(write_json(target, {"t": 1.5}, what="doc").read_text(), where="doc") == {"t": 1.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": NaN}', "a = NaN"),
        ('{"a": [1, -Infinity]}', r"a\[1\] = -Infinity"),
        ("[" * 100_000, "nested too deeply"),
        ('{"a": ' * 80 + "1" + "}" * 80, "nested too deeply"),
        ("{oops", "not valid JSON"),
    ],
)
def test_strict_json_reader_refuses_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        loads_json(text, where="f.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("f.json: ")


def test_tune_writes_an_untimed_candidate_as_null_not_infinity(tmp_path: Path) -> None:
    """In memory an untimed candidate has an infinite time; the saved profile is strict JSON with null."""
    from muonprof.profile import parse_profile, save_profile

    doc = {**PROFILE, "layers": {"net.0.weight": {"measured": {"time_ms": math.inf, "alignment": 0.9}}}}
    path = save_profile(parse_profile(doc), tmp_path / "p.json")
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    measured = loaded["layers"]["net.0.weight"]["measured"]
    assert measured.get("time_ms") is None and measured["alignment"] == 0.9


# ---------------------------------------------------------------------------------------------- ProfiledMuon


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


OPTIMIZER_CASES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lr": math.nan}, ValueError, "lr must be >= 0 and finite"),
    ({"lr": math.inf}, ValueError, "lr must be >= 0 and finite"),
    ({"weight_decay": math.inf}, ValueError, "weight_decay must be >= 0 and finite"),
    ({"weight_decay": math.nan}, ValueError, "weight_decay must be >= 0 and finite"),
    ({"adamw_lr": math.inf}, ValueError, "adamw_lr must be >= 0 and finite"),
    ({"adamw_betas": (0.9, math.nan)}, ValueError, "adamw_betas must be two numbers in"),
    ({"adamw_betas": (0.9,)}, ValueError, "adamw_betas must be two numbers in"),
    ({"adamw_eps": 0.0}, ValueError, "adamw_eps must be > 0 and finite"),
    ({"adamw_eps": math.inf}, ValueError, "adamw_eps must be > 0 and finite"),
    ({"adamw_weight_decay": -1.0}, ValueError, "adamw_weight_decay must be >= 0"),
    ({"momentum": math.nan}, ValueError, "momentum must be in"),
    ({"profile": 42}, TypeError, "profile must be None, a path .*got int"),
    ({"profile": {**PROFILE, "layers": {"2.weight": {"lr_scale": 1e308}}}}, ProfileError, r'layers\["2.weight"\]'),
    ({"profile": {**PROFILE, "layers": {"2.weight": {"lr_scale": math.nan}}}}, ProfileError, "lr_scale"),
    ({"profile": {**PROFILE, "defaults": {"lr_scale": 2e6}}}, ProfileError, "defaults.lr_scale"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), OPTIMIZER_CASES)
def test_profiled_muon_refuses_bad_settings_in_one_line(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        ProfiledMuon(_net(), **kwargs)
    assert "\n" not in str(info.value)


def _stepped(profile: dict[str, Any] | None) -> ProfiledMuon:
    net = _net()
    opt = ProfiledMuon(net, profile=profile)
    net(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    return opt


@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        (None, {**PROFILE, "layers": {"2.weight": {"optimizer": "adamw"}}}, "saved under another profile"),
        (None, {**PROFILE, "layers": {"2.weight": {"momentum_rank": 2}}}, "layer '2.weight'"),
        ({**PROFILE, "layers": {"2.weight": {"momentum_rank": 2}}}, None, "layer '2.weight'"),
    ],
)
def test_state_dict_from_another_profile_is_refused_naming_the_layer(
    saved: dict[str, Any] | None, loaded: dict[str, Any] | None, message: str
) -> None:
    state = _stepped(saved).state_dict()
    target = ProfiledMuon(_net(), profile=loaded)
    with pytest.raises(ValueError, match=message) as info:
        target.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert not target.state  # nothing half-loaded


def test_state_dict_round_trip_under_the_same_profile_still_loads() -> None:
    source = _stepped(None)
    target = ProfiledMuon(_net())
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.state.values(), target.state.values()):
        assert torch.equal(a["momentum_buffer"] if "momentum_buffer" in a else a["exp_avg"],
                           b["momentum_buffer"] if "momentum_buffer" in b else b["exp_avg"])  # fmt: skip


def test_fp16_parameters_stay_finite_under_adamw_and_muon() -> None:
    """AdamW runs through torch's fused kernel (fp32 math inside): fp16 parameters no longer turn NaN."""
    net = _net().half()
    opt = ProfiledMuon(net, adamw_lr=1e-3)
    assert any(not g["use_muon"] for g in opt.param_groups)  # the biases (and head) are AdamW layers
    x = torch.randn(16, 6, dtype=torch.float16)
    for _ in range(20):
        opt.zero_grad()
        net(x).float().square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    adamw_state = [opt.state[p] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert adamw_state and all(torch.isfinite(s["exp_avg_sq"]).all() for s in adamw_state)


def test_load_profile_refuses_non_paths_and_deep_mappings() -> None:
    with pytest.raises(TypeError, match="got float"):
        load_profile(1.5)  # type: ignore[arg-type]
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ProfileError, match="nested too deeply"):
        load_profile({**PROFILE, "provenance": deep})


# ------------------------------------------------------------------------------ option callback, directly


def test_range_callback_refuses_nan_and_bounds() -> None:
    import typer

    from muonprof.console import in_range

    app_ = typer.Typer()

    @app_.command()
    def go(x: float = typer.Option(0.5, "--x", callback=in_range(0, 1, lo_open=True))) -> None:
        print(f"x={x}")

    ok = runner.invoke(app_, ["--x", "1"])
    assert ok.exit_code == 0 and "x=1.0" in ok.output
    for bad in ("nan", "0", "1.01", "-inf"):
        result = runner.invoke(app_, ["--x", bad])
        assert result.exit_code == 2 and result.output.strip().startswith("error: --x must be a finite number > 0")


# ------------------------------------------------------------------------------ side effects of a failing run


def test_failing_run_removes_the_empty_output_folders_it_created(tmp_path: Path) -> None:
    import typer

    from muonprof._files import check_writable

    check_writable(tmp_path / "a" / "b" / "x.json")
    check_writable(tmp_path / "kept" / "y.json")
    (tmp_path / "kept" / "y.json").write_text("{}")  # this output was written: its folder stays
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(typer.Exit):
        fail("boom")
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "kept" / "y.json").read_text() == "{}"


def test_ctrl_c_in_tune_is_one_line_without_optunas_traceback(
    fixtures: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Optuna logs a KeyboardInterrupt'ed trial with its traceback through its own stderr handler: dropped."""
    import optuna

    import muonprof.tune.pipeline as pipeline

    def interrupted(request: Any, ui: Any) -> Any:
        def objective(trial: optuna.Trial) -> float:
            raise KeyboardInterrupt

        optuna.create_study().optimize(objective, n_trials=1)

    monkeypatch.setattr(pipeline, "run_tune", interrupted)
    # An earlier CliRunner test may have bound Optuna's handler to a stream that is closed now: start afresh,
    # so the handler the command configures writes into this run's captured output.
    optuna.logging._reset_library_root_logger()
    before = snapshot(fixtures)
    result = runner.invoke(app, ["tune", "mlp", "--out", "new/p.json"])
    captured = capfd.readouterr()
    text = result.output + captured.out + captured.err
    assert result.exit_code == 130
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0]
    assert snapshot(fixtures) == before


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer turns Ctrl-C into a silent exit 130; the root group prints one line and removes the empty output
    folders the run created first."""
    import muonprof.profile
    from muonprof._files import check_writable

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        check_writable(tmp_path / "made" / "p.json")  # the run has created an output folder by now
        raise KeyboardInterrupt

    monkeypatch.setattr(muonprof.profile, "load_profile", interrupted)
    result = runner.invoke(app, ["profile", "show", "p.json"])
    assert result.exit_code == 130, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == ["interrupted"]
    assert not (tmp_path / "made").exists()
