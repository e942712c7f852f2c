"""`muonprof models` and `muonprof spectrum` as a new user runs them, and every bad input the issue lists."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from muonprof.capture import load_spectra
from muonprof.cli import app
from muonprof.workload import build_workload

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def spectrum_json(tmp_path: Path, *args: str) -> dict:
    code, out, err = run("spectrum", *args, "--json", "--out", str(tmp_path / "s.pt"))
    assert code == 0, err
    return json.loads(out)


def test_models_lists_builtins_with_counts() -> None:
    code, out, _ = run("models", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert {"gpt2-tiny", "gpt2-small", "llama-20m", "llama-60m", "llama-130m", "vit-tiny", "mlp"} <= set(rows)
    assert abs(rows["gpt2-small"]["parameters"] - 124.4e6) < 0.1e6
    code, out, _ = run("models")
    assert code == 0 and "llama-60m" in out


def test_spectrum_on_gpt2_tiny_writes_artifact_plot_and_json(tmp_path: Path) -> None:
    plot = tmp_path / "spectrum.png"
    result = spectrum_json(
        tmp_path, "gpt2-tiny", "--steps", "3", "--every", "2", "--warmup-steps", "0", "--batch-size", "2",
        "--seq-len", "32", "--plot", str(plot), "--save-matrices",
    )  # fmt: skip
    assert [c["step"] for c in result["captures"]] == [1, 2, 3]
    names = [layer["name"] for layer in result["layers"]]
    roles = {layer["name"]: layer["role"] for layer in result["layers"]}
    assert roles["blocks.0.attn.q_proj.weight"] == "attn_q" and roles["blocks.1.mlp.down_proj.weight"] == "mlp_down"
    assert roles["embed_tokens.weight"] == "embedding"
    stats = result["captures"][-1]["layers"]["blocks.0.mlp.up_proj.weight"]["momentum"]
    assert stats["energy_rank_90"] <= stats["energy_rank_99"] <= 64
    assert result["meta"]["model"]["seq_len"] == 32 and result["meta"]["steps"] == 3
    assert result["meta"]["timings"]["train_s"] > 0 and result["meta"]["timings"]["capture_s"] > 0
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    spectra = load_spectra(tmp_path / "s.pt")
    assert [layer.name for layer in spectra.layers] == names
    assert spectra.matrices is not None and spectra.matrices_step == 3
    assert spectra.meta["fingerprint"].startswith("sha256:")


def test_spectrum_table_output(tmp_path: Path) -> None:
    code, out, err = run("spectrum", "llama-tiny", "--steps", "2", "--every", "1", "--batch-size", "2",
                         "--seq-len", "16", "--out", str(tmp_path / "l.pt"))  # fmt: skip
    assert code == 0, err
    assert "mlp_gate" in out and "attn_q" in out and "wrote" in out


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("vit-tiny", ["--set", "depth=1", "--set", "width=48", "--set", "heads=2", "--set", "mlp=96"]),
        ("mlp", []),
        ("llama-20m", ["--set", "depth=1", "--set", "vocab=256", "--seq-len", "16"]),
    ],
)
def test_spectrum_on_other_families(tmp_path: Path, model: str, extra: list[str]) -> None:
    result = spectrum_json(tmp_path, model, "--steps", "2", "--every", "1", "--batch-size", "4", *extra)
    roles = {layer["role"] for layer in result["layers"]}
    assert result["layers"] and all(c["loss"] > 0 for c in result["captures"])
    if model == "vit-tiny":
        assert {"attn_q", "mlp_up", "stem"} <= roles
        assert result["meta"]["model"]["data"]["source"] == "synthetic"


FACTORY = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    """Starts from an nn.Embedding: trained as a causal LM on the text corpus, by convention."""

    def __init__(self, vocab=256, width=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


def build(width=32):
    return TinyLM(width=width)


def not_a_module():
    return 42


def only_vectors():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

    return {"model": Scale(), "batches": lambda step: torch.ones(3), "loss": lambda m, b: (m.s * b).sum()}


def diverging():
    model = nn.Linear(4, 4)

    def loss(m, step):
        value = m(torch.ones(1, 4)).sum()
        return value * float("nan") if step >= 1 else value

    return {"model": model, "batches": lambda step: step, "loss": loss}


def interrupted():
    model = nn.Linear(4, 4)

    def batches(step):
        if step >= 1:
            raise KeyboardInterrupt
        return torch.ones(2, 4)

    return {"model": model, "batches": batches, "loss": lambda m, b: m(b).square().sum()}


def broken():
    raise RuntimeError("factory exploded")
'''


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "user_models"


def test_spectrum_on_a_user_factory(tmp_path: Path, factory_module: str) -> None:
    result = spectrum_json(
        tmp_path, f"{factory_module}:build", "--steps", "2", "--every", "1", "--batch-size", "2", "--seq-len", "16",
        "--set", "width=24",
    )  # fmt: skip
    routes = {layer["name"]: layer["optimizer"] for layer in result["layers"]}
    assert routes == {"emb.weight": "adamw", "mix.weight": "muon", "out.weight": "adamw"}
    assert result["meta"]["model"]["task"]["kind"] == "lm"
    # The file path form works as well.
    result = spectrum_json(tmp_path, "user_models.py:build", "--steps", "1", "--every", "1", "--seq-len", "8")
    assert len(result["layers"]) == 3


def bad(*args: str) -> tuple[int, str]:
    code, _, err = run(*args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    return code, "\n".join(lines)


def test_bad_models(tmp_path: Path, factory_module: str) -> None:
    out = ["--out", str(tmp_path / "x.pt")]
    code, err = bad("spectrum", "gpt5-huge", *out)
    assert code == 2 and "unknown model 'gpt5-huge'" in err and "gpt2-tiny" in err and err.count("\n") == 0
    code, err = bad("spectrum", "no_such_module_xyz:build", *out)
    assert code == 2 and "no_such_module_xyz" in err
    code, err = bad("spectrum", f"{factory_module}:not_a_module", *out)
    assert code == 2 and "int" in err
    code, err = bad("spectrum", f"{factory_module}:broken", *out)
    assert code == 2 and "factory exploded" in err
    code, err = bad("spectrum", f"{factory_module}:only_vectors", "--steps", "1", *out)
    assert code == 1 and "no matrix parameters" in err
    code, err = bad("spectrum", "gpt2-tiny", "--set", "depth", *out)
    assert code == 2 and "depth" in err
    assert not (tmp_path / "x.pt").exists()


def test_bad_options_and_data(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "x.pt")]
    code, err = bad("spectrum", "gpt2-tiny", "--steps", "0", *out)
    assert code == 2 and "--steps" in err
    code, err = bad("spectrum", "gpt2-tiny", "--seq-len", "4096", *out)
    assert code == 2 and "4096" in err and "128" in err
    code, err = bad("spectrum", "gpt2-tiny", "--data", str(tmp_path / "nowhere"), *out)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = bad("spectrum", "gpt2-tiny", "--data", str(tmp_path / "empty"), *out)
    assert code == 2 and "empty" in err
    code, err = bad("spectrum", "gpt2-tiny", "--optimizer", "sgd", *out)
    assert code == 2 and "muon or adamw" in err
    code, err = bad("spectrum", "gpt2-tiny", "--device", "cuda", *out)
    assert code == 2 and "cuda" in err
    (tmp_path / "a_file").write_text("x")
    code, err = bad("spectrum", "gpt2-tiny", "--out", str(tmp_path / "a_file" / "s.pt"))
    assert code == 2 and "a_file" in err
    assert not (tmp_path / "x.pt").exists()


def test_user_text_data(tmp_path: Path) -> None:
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200 + str(i))
    result = spectrum_json(tmp_path, "gpt2-tiny", "--data", str(text), "--steps", "1", "--seq-len", "16",
                           "--batch-size", "2")  # fmt: skip
    assert str(text) in result["meta"]["model"]["data"]["source"]


def test_nonfinite_loss_and_interrupt_leave_no_artifact(tmp_path: Path, factory_module: str) -> None:
    target = tmp_path / "never.pt"
    code, err = bad("spectrum", f"{factory_module}:diverging", "--steps", "4", "--out", str(target))
    assert code == 1 and "became nan at step 2" in err and "no spectra file written" in err
    assert not target.exists()
    result = runner.invoke(app, ["spectrum", f"{factory_module}:interrupted", "--steps", "4", "--out", str(target)])
    assert result.exit_code != 0
    assert not target.exists() and not list(tmp_path.glob(".never.pt.*"))


def test_same_seed_same_init_and_batches() -> None:
    a = build_workload("gpt2-tiny", seq_len=16, batch_size=2, seed=7)
    b = build_workload("gpt2-tiny", seq_len=16, batch_size=2, seed=7)
    c = build_workload("gpt2-tiny", seq_len=16, batch_size=2, seed=8)
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    for step in (0, 5):
        xa, ya = a.train_batch(step)
        xb, yb = b.train_batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert torch.isfinite(a.loss(a.train_batch(0)))
    # Building a workload does not disturb the caller's random stream.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_workload("mlp", seed=3)
    assert torch.equal(torch.rand(3), expected)
