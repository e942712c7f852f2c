"""Typed artifacts: shipped JSON Schemas equal the generated ones, files the current code writes validate
against them, old-format files load through their migration, a migration bug is its own message, newer or
foreign formats are refused, each model names a bad field in one line, and round trips are lossless."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from torch import nn
from typer.testing import CliRunner

from muonprof.artifacts import MODULES, get_kind
from muonprof.bench import BenchError, load_bench, parse_grid, run_bench, save_bench
from muonprof.bench.schema import Bench
from muonprof.capture import CaptureRecord, LayerRecord, Spectra, SpectraError, load_spectra, save_spectra
from muonprof.capture.run import capture_spectra
from muonprof.capture.schema import SpectraDocument, spectra_view
from muonprof.cli import app
from muonprof.train import EvalPoint, TrainResult
from muonprof.validate import ContenderRuns, ResultsFormatError, load_results, save_results
from muonprof.validate.results import ValidationResult
from muonprof.validate.schema import ValidateDocument
from muonprof.workload import Workload

try:  # the schemas are also checked by an independent validator when one is installed
    import jsonschema
except ImportError:  # pragma: no cover - depends on the environment
    jsonschema = None

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def check_against_schema(kind: str, document: dict[str, Any], model: type[BaseModel]) -> None:
    """``document`` passes the kind's pydantic model and, where jsonschema is installed, its shipped schema."""
    model.model_validate(document)
    if jsonschema is not None:
        jsonschema.validate(document, get_kind(kind).shipped_json_schema())


# ------------------------------------------------------------------------------------------------ fixtures


def tiny_spectra() -> Spectra:
    """Two layers of known spectra (one 6 x 4 Muon layer twice, so bench has a role with two members)."""
    layers = [LayerRecord(f"l{i}.weight", (6, 4), (6, 4), "mlp_up", "muon") for i in range(2)]
    s = torch.tensor([3.0, 1.0, 0.5, 0.1])
    captures = [
        CaptureRecord(step, 1.0 / step, {la.name: s * step for la in layers}, {la.name: s for la in layers})
        for step in (1, 2)
    ]
    return Spectra({"fingerprint": "abc", "model": {"spec": "tiny"}}, layers, captures, losses=[1.0, 0.5])


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench file written by the current code (svd and the default, one seed, no device probe)."""
    clock = iter(float(i) * 1e-3 for i in range(1_000_000))
    result = run_bench(
        tiny_spectra(), device=CPU, grid=parse_grid(methods="svd"), seeds=1, probe=False, clock=lambda: next(clock)
    )
    return save_bench(result, tmp_path_factory.mktemp("bench") / "tiny.bench.json")


def run_of(losses: list[float]) -> TrainResult:
    steps = len(losses)
    run = TrainResult(steps_planned=steps, wall_s=[float(k) for k in range(1, steps + 1)], step_s=[1.0] * steps)
    run.optimizer_step_s, run.train_losses, run.grad_evals = [0.5] * steps, list(losses), list(range(1, steps + 1))
    run.evals = [EvalPoint(0, 0.0, 9.0), EvalPoint(steps, float(steps), losses[-1])]
    return run


def results() -> ValidationResult:
    contenders = {
        "default": ContenderRuns("default", {"recipe": "default"}, {s: run_of([3.0, 2.5 + s / 10]) for s in (0, 1)}),
        "p": ContenderRuns("p", {}, {s: run_of([3.0, 2.4 + s / 10]) for s in (0, 1)}),
        "gone": ContenderRuns("gone", {}, skipped="not asked for"),
    }
    result = ValidationResult({"steps": 2, "cpu_load_before": [0.5, 0.5, 0.5]}, [0, 1], contenders)
    result.summarize()
    return result


# --------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_shipped_schema_is_the_generated_one(kind: str) -> None:
    artifact = get_kind(kind)
    assert artifact.shipped_json_schema() == artifact.json_schema(), (
        f"run: muonprof schema {kind} --out {artifact.schema_package.replace('.', '/')}/{artifact.schema_file}"
    )
    assert artifact.json_schema()["$id"].endswith(f"/{kind}-{artifact.version}.json")


def test_pyproject_ships_every_schema() -> None:
    text = (REPO / "pyproject.toml").read_text()
    for kind in MODULES:
        assert f'"{get_kind(kind).schema_package}" = ["*.json"]' in text


def test_schema_command_prints_each_kind_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    runner = CliRunner()
    for kind in MODULES:
        result = runner.invoke(app, ["schema", kind])
        assert result.exit_code == 0 and json.loads(result.stdout) == get_kind(kind).json_schema()
    result = runner.invoke(app, ["schema", "bench", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 0 and json.loads((tmp_path / "b.json").read_text()) == get_kind("bench").json_schema()
    result = runner.invoke(app, ["schema", "nope"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: unknown artifact kind 'nope' (known: bench, profile, spectra, validate)"


# ------------------------------------------------------------------------------ what the code writes now


def test_a_bench_file_validates_and_round_trips(bench_file: Path) -> None:
    document = json.loads(bench_file.read_text())
    assert document["format"] == "muonprof.bench/2"
    check_against_schema("bench", document, Bench)
    back = load_bench(bench_file)
    assert json.loads(back.dumps()) == document  # lossless
    assert load_bench(save_bench(back, bench_file.with_name("again.json"))).to_json() == back.to_json()


def test_a_captured_spectra_file_validates_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    xs, ys = torch.randn(16, 6), torch.randint(0, 3, (16,))
    workload = Workload(
        "tiny", model, None, lambda step: (xs, ys), lambda: [],
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), None, None,
    )  # fmt: skip
    path = save_spectra(capture_spectra(workload, steps=3, every=1, warmup_steps=1), tmp_path / "t.spectra.pt")
    payload = torch.load(path, weights_only=True)
    view = spectra_view(payload)
    assert "grad" not in json.dumps(view) and view["meta"]["warmup_steps"] == 1
    check_against_schema("spectra", json.loads(json.dumps(view)), SpectraDocument)
    loaded = load_spectra(path)
    again = load_spectra(save_spectra(loaded, tmp_path / "again.pt"))
    assert again.meta == loaded.meta and again.layers == loaded.layers and again.losses == loaded.losses
    assert [(c.step, c.loss) for c in again.captures] == [(c.step, c.loss) for c in loaded.captures]


def test_validate_results_validate_and_round_trip(tmp_path: Path) -> None:
    result = results()
    path = save_results(result, tmp_path / "r.json")
    document = json.loads(path.read_text())
    check_against_schema("validate", document, ValidateDocument)
    back = load_results(path)
    assert back.to_dict() == document  # lossless, summary included
    for shipped in (REPO / "gpt2-tiny.validate.json", REPO / "tests" / "data" / "validate_v1.json"):
        check_against_schema("validate", json.loads(shipped.read_text()), ValidateDocument)


# ------------------------------------------------------------------------------------ old formats


def bench_v1(state: bool = False) -> dict[str, Any]:
    """A minimal hand-made bench/1 document: one 6 x 4 layer, the default candidate timed, no derived data."""
    timing = {"median_s": 2e-3, "min_s": 2e-3, "max_s": 3e-3, "p10_s": 2e-3, "p90_s": 3e-3, "repeats": 3,
              "warmup_s": 4e-3}  # fmt: skip
    config = {"method": "newton_schulz", "ns_steps": 5, "coefficients": "jordan", "dtype": "bfloat16"}
    cost = {"shape": [6, 4], "label": "ns5-jordan-bf16", "config": config, "count": 1, "batch": 1, "time_s": timing}
    if state:
        cost["state_bytes"] = 6 * 4 * 4 + 4
    measures = {"alignment": 0.8, "rel_err": 0.3, "sv_min": 0.7, "sv_max": 1.1, "source": "spectral model"}
    return {
        "format": "muonprof.bench/1",
        "meta": {"seeds": 1},
        "layers": [{"name": "a.weight", "matrix_shape": [6, 4], "role": "mlp_up", "optimizer": "muon"}],
        "costs": [cost],
        "accuracy": {"a.weight": {"ns5-jordan-bf16": measures}},
    }


def write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_a_bench_1_file_is_upgraded_by_its_migration(tmp_path: Path) -> None:
    result = load_bench(write(tmp_path / "old.json", bench_v1()))
    assert result.costs[0].state_bytes == 6 * 4 * 4 + 4
    assert result.summary["default_state_bytes"] == 6 * 4 * 4 + 4 and result.summary["baseline"] == "ns5-jordan-bf16"
    assert result.summary["default_step_s"] == pytest.approx(2e-3)
    assert [p["label"] for p in result.fronts["roles_state"]["mlp_up"]] == ["ns5-jordan-bf16"]
    saved = json.loads(result.dumps())
    assert saved["format"] == "muonprof.bench/2"
    assert load_bench(write(tmp_path / "new.json", saved)).to_json() == result.to_json()


def test_a_bench_1_file_without_layers_is_only_retagged(tmp_path: Path) -> None:
    document = {**bench_v1(state=True), "layers": [], "accuracy": {}}
    result = load_bench(write(tmp_path / "old.json", document))
    assert result.to_json() == {**document, "format": "muonprof.bench/2", "costs": result.to_json()["costs"],
                                "model_check": {}, "fronts": {}, "summary": {}}  # fmt: skip
    assert result.costs[0].state_bytes == 6 * 4 * 4 + 4


def test_a_bug_in_the_bench_migration_is_reported_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import muonprof.bench.artifact as artifact

    def broken(shape: Any, config: Any) -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(artifact, "state_bytes", broken)
    with pytest.raises(BenchError) as info:
        load_bench(write(tmp_path / "old.json", bench_v1()))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'old.json'}: migration bench/1->2 failed: ZeroDivisionError")
    assert "a bug in muonprof" in message and "corrupt" not in message and "\n" not in message


def test_a_damaged_bench_1_file_is_reported_as_damaged_not_as_a_migration_bug(tmp_path: Path) -> None:
    document = bench_v1()
    document["costs"][0]["shape"] = [6]
    with pytest.raises(BenchError, match=r"old\.json: corrupt bench file: costs\[0\]\.shape: List should have"):
        load_bench(write(tmp_path / "old.json", document))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format": "muonprof.bench/3"}, "format 'muonprof.bench/3' was written by a newer muonprof"),
        ({"format": "muonprof.profile/1"}, "format 'muonprof.profile/1' is a muonprof profile file, not a bench file"),
        ({"format": 2}, "format 2 is not a muonprof format (expected 'muonprof.bench/2')"),
    ],
)
def test_newer_and_foreign_bench_formats(tmp_path: Path, document: Any, message: str) -> None:
    with pytest.raises(BenchError) as info:
        load_bench(write(tmp_path / "b.json", document))
    assert str(info.value).startswith(f"{tmp_path / 'b.json'}: {message}")


def test_newer_spectra_and_results_formats(tmp_path: Path) -> None:
    torch.save({"format": "muonprof.spectra/2"}, tmp_path / "s.pt")
    with pytest.raises(SpectraError, match=r"'muonprof\.spectra/2' was written by a newer muonprof"):
        load_spectra(tmp_path / "s.pt")
    with pytest.raises(ResultsFormatError, match=r"'muonprof\.validate/2' was written by a newer muonprof"):
        load_results(write(tmp_path / "r.json", {"format": "muonprof.validate/2"}))
    with pytest.raises(ResultsFormatError, match=r"r\.json: format 'muonprof\.bench/2' is a muonprof bench file"):
        load_results(write(tmp_path / "r.json", {"format": "muonprof.bench/2"}))


# ----------------------------------------------------------------------------------------- bad fields


def bench_document(bench_file: Path) -> dict[str, Any]:
    return json.loads(bench_file.read_text())


BENCH_BAD = [
    (lambda d: d["costs"][0].update(count=0), "costs[0].count: Input should be greater than 0"),
    (lambda d: d["costs"][0].update(colour="red"), "costs[0].colour: Extra inputs are not permitted"),
    (lambda d: d["costs"][0].update(config={"method": "magic"}), "costs[0].config: not a bench candidate"),
    (lambda d: d["costs"][0].update(rounds=-1), "costs[0].rounds: Input should be greater than or equal to 0"),
    (lambda d: d["layers"][0].update(matrix_shape=[6]), "layers[0].matrix_shape: List should have at least 2"),
    (lambda d: d["accuracy"]["l0.weight"]["svd"].update(rel_err=-1), 'accuracy["l0.weight"].svd.rel_err: Input'),
    (lambda d: d.update(colour=1), "colour: Extra inputs are not permitted"),
    (lambda d: d["summary"].pop("default_state_bytes"), "summary: default_state_bytes is required"),
    (lambda d: d["fronts"].pop("roles_state"), "fronts: roles_state is required when the file has layers"),
    (lambda d: d.pop("layers"), "layers: Field required"),
]


@pytest.mark.parametrize(("damage", "message"), BENCH_BAD)
def test_the_bench_model_names_a_bad_field(bench_file: Path, tmp_path: Path, damage: Any, message: str) -> None:
    document = bench_document(bench_file)
    damage(document)
    with pytest.raises(BenchError) as info:
        load_bench(write(tmp_path / "bad.json", document))
    assert f"bad.json: corrupt bench file: {message}" in str(info.value) and "\n" not in str(info.value)


def test_an_invalid_bench_result_is_never_written(bench_file: Path, tmp_path: Path) -> None:
    result = load_bench(bench_file)
    result.costs[0].count = 0
    with pytest.raises(BenchError, match=r"cannot write an invalid bench file: costs\[0\]\.count"):
        save_bench(result, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_the_spectra_model_names_a_bad_field(tmp_path: Path) -> None:
    path = save_spectra(tiny_spectra(), tmp_path / "s.pt")
    cases = [
        (lambda p: p["layers"][0].update(matrix_shape=[6, 0]), "layers[0].matrix_shape[1]: Input should be greater"),
        (lambda p: p["captures"][0].update(step=-1), "captures[0].step: Input should be greater than or equal to 0"),
        (lambda p: p["captures"][1].pop("grad"), "captures[1].grad: must map each layer to its singular values"),
        (lambda p: p["meta"].update(warmup_steps="x"), "meta.warmup_steps: Input should be a valid integer"),
        (lambda p: p.update(colour=1), "colour: Extra inputs are not permitted"),
    ]
    for damage, message in cases:
        payload = torch.load(path, weights_only=True)
        damage(payload)
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(SpectraError) as info:
            load_spectra(tmp_path / "bad.pt")
        assert f"bad.pt: corrupt spectra file: {message}" in str(info.value) and "\n" not in str(info.value)
    bad = tiny_spectra()
    bad.captures[0].step = -1
    with pytest.raises(SpectraError, match=r"cannot write an invalid spectra file: captures\[0\]\.step"):
        save_spectra(bad, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


def test_the_validate_model_names_a_bad_field(tmp_path: Path) -> None:
    document = results().to_dict()
    cases = [
        (lambda d: d["contenders"]["p"]["runs"][0].update(eval_s=-1), 'contenders.p.runs[0].eval_s: Input should be'),
        (lambda d: d["contenders"]["p"]["runs"][1].pop("evals"), "contenders.p.runs[1].evals: Field required"),
        (lambda d: d["contenders"]["p"].update(colour=1), "contenders.p.colour: Extra inputs are not permitted"),
        (lambda d: d.update(seeds="0"), "seeds: Input should be a valid list"),
        (lambda d: d["meta"].update(steps=-2), "meta.steps: Input should be greater than or equal to 0"),
    ]
    for damage, message in cases:
        broken = copy.deepcopy(document)
        damage(broken)
        with pytest.raises(ResultsFormatError) as info:
            load_results(write(tmp_path / "bad.json", broken))
        assert f"bad.json: corrupt validate results file: {message}" in str(info.value)
        assert "\n" not in str(info.value)


def test_the_bench_artifact_does_not_import_the_bench_run() -> None:
    """The bench/1 upgrade used to import bench.run inside the loader (an import cycle): the migration now
    derives through bench.pareto, so the artifact module imports neither run nor anything that imports it."""
    import ast

    import muonprof.bench.artifact as artifact

    tree = ast.parse(Path(artifact.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "run" not in imported and not any((name or "").endswith(".run") for name in imported)
    assert {"cost", "candidates", "pareto", "schema"} <= imported
