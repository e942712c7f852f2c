"""Model specs: the built-in zoo, overrides, user factories and workloads, task inference, hf:PATH."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from muonprof.models import (
    BUILTINS,
    LoadedModel,
    ModelSpecError,
    TaskInfo,
    catalog,
    infer_task,
    load_model,
    load_spec,
    parse_overrides,
)
from muonprof.models import llama as llama_module
from muonprof.optim.routing import route_module

# Tiny sizes for every family, so the real (non-meta) builds below stay fast.
TINY = {
    "gpt2-tiny": {},
    "gpt2-small": {"width": 32, "depth": 1, "heads": 2, "vocab": 64, "seq_len": 32},
    "llama-tiny": {},
    "llama-20m": {"width": 32, "depth": 1, "heads": 2, "intermediate": 48, "vocab": 64},
    "llama-60m": {"width": 32, "depth": 1, "heads": 2, "intermediate": 48, "vocab": 64},
    "llama-130m": {"width": 32, "depth": 1, "heads": 2, "intermediate": 48, "vocab": 64},
    "vit-tiny": {"width": 48, "depth": 1, "mlp": 96},
    "mlp": {},
}


def sample_input(task: TaskInfo, batch: int = 2) -> torch.Tensor:
    if task.kind == "lm":
        return torch.randint(0, task.vocab_size, (batch, 12))
    if task.kind == "image":
        return torch.randn(batch, task.channels, task.image_size, task.image_size)
    return torch.randn(batch, task.in_features)


def module_name() -> str:
    return f"mp_user_{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------- built-ins


def test_every_builtin_has_tiny_settings_here() -> None:
    assert set(TINY) == set(BUILTINS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_builtin_forward_matches_its_task(name: str) -> None:
    torch.manual_seed(0)
    loaded = load_spec(name, **TINY[name])
    assert loaded.source == "builtin" and loaded.spec == name
    model, task = loaded.model, loaded.task
    assert model.muonprof_task == task and model.muonprof_config == loaded.config
    out = model(sample_input(task))
    if task.kind == "lm":
        assert out.shape == (2, 12, task.vocab_size)
    else:
        assert out.shape == (2, task.num_classes)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_catalog_param_counts() -> None:
    rows = {row["name"]: row for row in catalog()}
    assert list(rows) == list(BUILTINS)
    assert all(row["description"] and row["family"] in ("gpt2", "llama", "vit", "mlp") for row in rows.values())
    # GPT-2 small is the famous 124M with the head tied to the token embedding (counted once)
    assert rows["gpt2-small"]["parameters"] == 124_439_808
    assert rows["gpt2-small"]["muon_parameters"] == 12 * 12 * 768**2  # q, k, v, o + 4x up and down per block

    def llama(h: int, i: int, layers: int, vocab: int = 32000) -> int:
        return 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h

    assert rows["llama-20m"]["parameters"] == llama(256, 688, 4) == 19_548_416
    assert rows["llama-60m"]["parameters"] == llama(512, 1376, 8) == 58_073_600
    assert rows["llama-130m"]["parameters"] == llama(768, 2048, 12) == 134_105_856
    assert rows["llama-tiny"]["parameters"] == llama(64, 172, 2, vocab=256)
    assert rows["llama-130m"]["muon_parameters"] == 12 * (4 * 768**2 + 3 * 768 * 2048)
    # DeiT-Tiny blocks (5.3M) with a 10-class head and 65 position slots instead of 197
    assert rows["vit-tiny"]["parameters"] == 5_362_762
    assert rows["vit-tiny"]["muon_parameters"] == 12 * (4 * 192**2 + 2 * 192 * 768)
    assert rows["mlp"]["parameters"] == 64 * 256 + 256 + 2 * (256 * 256 + 256) + 256 * 10 + 10
    assert rows["gpt2-small"]["muon_matrices"] == 12 * 6 and rows["llama-60m"]["muon_matrices"] == 8 * 7
    assert rows["gpt2-small"]["config"]["n_embd"] == 768 and rows["vit-tiny"]["config"]["patch"] == 4


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_language_models_are_causal(name: str) -> None:
    torch.manual_seed(0)
    model = load_model(name).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3


def _permuted_prefix_gap(model: nn.Module) -> float:
    """One causal attention layer without positions is a set function of the prefix: permuting all tokens but
    the last leaves the last position's logits unchanged. Any difference is position information. (With two
    layers the causal mask itself leaks order, so the models here have one.)"""
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 16))
    order = torch.cat((torch.randperm(15), torch.tensor([15])))
    with torch.no_grad():
        return (model(tokens)[:, -1] - model(tokens[:, order])[:, -1]).abs().max().item()


def test_rotary_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = load_model("llama-tiny", depth=1).eval()
    assert not any("rotary" in name or "pos_embed" in name for name, _ in model.named_parameters())
    assert _permuted_prefix_gap(model) > 1e-3
    monkeypatch.setattr(llama_module, "apply_rotary", lambda x, cos, sin: x)
    assert _permuted_prefix_gap(model) < 1e-5  # the check above really measures the rotation


def test_gpt2_uses_its_learned_positions() -> None:
    torch.manual_seed(0)
    model = load_model("gpt2-tiny", depth=1).eval()
    assert _permuted_prefix_gap(model) > 1e-4
    with torch.no_grad():
        model.pos_embed.weight.zero_()
    assert _permuted_prefix_gap(model) < 1e-5
    with pytest.raises(ValueError, match="exceeds n_positions 128"):
        load_model("gpt2-tiny")(torch.zeros(1, 129, dtype=torch.long))


def test_gpt2_head_is_tied_and_init_scales_residuals() -> None:
    model = load_model("gpt2-small", depth=8, width=64, heads=4, vocab=128, seq_len=64)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)
    assert model.blocks[0].attn.q_proj.bias is not None and not model.blocks[0].attn.q_proj.bias.any()


def test_llama_has_no_biases_and_an_untied_head() -> None:
    model = load_model("llama-tiny")
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    assert isinstance(model.layers[0].input_norm, nn.RMSNorm)


def _expected_route(name: str) -> str:
    if name.endswith(".bias") or name in ("cls_token",) or "norm" in name or ".ln_" in name or "ln_f" in name:
        return "adamw"
    if any(part in name for part in ("embed_tokens", "pos_embed", "lm_head", "patch_embed", "head.")):
        return "adamw"
    assert any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return "muon"


@pytest.mark.parametrize(("name", "overrides"), [("gpt2-tiny", {"vocab": 320}), ("llama-tiny", {}), ("vit-tiny", {})])
def test_routing_of_builtins(name: str, overrides: dict) -> None:
    with torch.device("meta"):
        model = load_model(name, **overrides)
    routes = route_module(model)
    assert set(routes) == {n for n, _ in model.named_parameters()}
    wrong = {n: r for n, r in routes.items() if r[0] != _expected_route(n)}
    assert not wrong
    assert {r for r, _ in routes.values()} == {"muon", "adamw"}


def test_routing_of_gpt2_tiny_with_a_vocabulary_equal_to_the_mlp_width() -> None:
    test_routing_of_builtins("gpt2-tiny", {})


# ---------------------------------------------------------------------------------------------- overrides


def test_parse_overrides_coerces_values() -> None:
    parsed = parse_overrides(["width=128", "eps=1e-5", "flag=TRUE", "off=false", "name=abc", "empty="])
    assert parsed == {"width": 128, "eps": 1e-5, "flag": True, "off": False, "name": "abc", "empty": ""}
    assert type(parsed["width"]) is int and type(parsed["eps"]) is float
    for bad in (["width"], ["=3"], ["a b=3"], ["width=1", "width=2"]):
        with pytest.raises(ModelSpecError, match="--set"):
            parse_overrides(bad)


def test_overrides_apply_through_aliases_and_field_names() -> None:
    loaded = load_spec("gpt2-tiny", width=32, heads=2, depth=1, seq_len=16)
    assert loaded.config["n_embd"] == 32 and loaded.config["n_layer"] == 1 and loaded.config["n_positions"] == 16
    assert loaded.task.max_seq_len == 16 and len(loaded.model.blocks) == 1
    loaded = load_spec("llama-tiny", **parse_overrides(["intermediate=96", "vocab=100", "rope_theta=500000"]))
    assert loaded.model.layers[0].mlp.up_proj.out_features == 96 and loaded.task.vocab_size == 100
    assert loaded.config["rope_theta"] == 500000.0
    loaded = load_spec("vit-tiny", image_size=16, patch=8, classes=3, channels=1, depth=1)
    assert loaded.model.pos_embed.num_embeddings == 5 and loaded.task.num_classes == 3 and loaded.task.channels == 1
    assert load_spec("mlp", width="16", in_features=8).model[0].weight.shape == (16, 8)  # strings parse as on the CLI


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gpt2-tiny", {"colour": 3}, r"unknown setting 'colour'; valid: depth, heads, layer_norm_eps, n_embd"),
        ("vit-tiny", {"vocab": 100}, r"'vocab' does not apply to a vit model; valid: .*image_size"),
        ("mlp", {"heads": 2}, r"'heads' does not apply to a mlp model"),
        ("gpt2-tiny", {"width": "abc"}, r"width must be a positive integer, got 'abc'"),
        ("gpt2-tiny", {"depth": 0}, r"depth must be a positive integer, got 0"),
        ("llama-tiny", {"width": 64.5}, r"width must be a positive integer"),
        ("llama-tiny", {"depth": True}, r"depth must be a positive integer"),
        ("llama-tiny", {"rope_theta": -1}, r"rope_theta must be a positive number"),
        ("gpt2-tiny", {"width": 66}, r"gpt2-tiny: n_embd \(width\) 66 is not divisible by n_head \(heads\) 4"),
        ("llama-tiny", {"width": 60, "heads": 4}, r"head dim .* 15 must be even for rotary"),
        ("vit-tiny", {"image_size": 30}, r"image_size 30 is not divisible by patch 4"),
        ("vit-tiny", {"width": 100}, r"dim \(width\) 100 is not divisible by heads 3"),
        ("gpt2-tiny", {"width": 32, "n_embd": 32}, r"'n_embd' and 'width' both set n_embd|'width' and 'n_embd'"),
    ],
)
def test_bad_overrides_are_one_line_errors(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message) as info:
        load_model(name, **overrides)
    assert "\n" not in str(info.value)


def test_unknown_model_suggests_a_builtin() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model 'gpt2-smal' \(did you mean 'gpt2-small'\?\)"):
        load_model("gpt2-smal")


# ---------------------------------------------------------------------------------------------- user factories


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Write a module under a fresh name on sys.path; returns a function text -> module name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(text: str) -> str:
        name = module_name()
        (tmp_path / f"{name}.py").write_text(text)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


FACTORY = """
import torch
from torch import nn

def build(width=8, classes=3):
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, classes))

def lm():
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))

def workload(kind="dict"):
    model = nn.Linear(4, 2)
    data = ((torch.full((3, 4), float(i)), torch.zeros(3, dtype=torch.long)) for i in range(3))
    loss = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    parts = dict(model=model, loss=loss, batches=data, val_batches=[(torch.ones(3, 4), torch.ones(3).long())])
    if kind == "object":
        from types import SimpleNamespace
        return SimpleNamespace(model=model, loss=loss, batches=lambda step: (torch.full((2, 4), step), None))
    if kind == "task":
        parts["task"] = {"kind": "vector", "in_features": 4, "num_classes": 2}
    if kind == "missing":
        del parts["loss"]
    if kind == "typo":
        parts["val_batch"] = parts.pop("val_batches")
    if kind == "notmodule":
        parts["model"] = "linear"
    return parts

def broken():
    raise RuntimeError("no GPU here\\nsecond line")

def returns_int():
    return 42

NOT_CALLABLE = 3
"""


def test_factory_module_returns_a_module(user_module) -> None:  # type: ignore[no-untyped-def]
    name = user_module(FACTORY)
    loaded = load_spec(f"{name}:build", width=16)
    assert isinstance(loaded, LoadedModel) and loaded.source == "factory" and loaded.config == {"width": 16}
    assert loaded.model[0].out_features == 16
    assert loaded.task == TaskInfo(kind="vector", in_features=5, num_classes=3)
    assert loaded.batches is None and loaded.loss is None
    assert load_spec(f"{name}:lm").task == TaskInfo(kind="lm", vocab_size=50)
    assert isinstance(load_model(f"{name}:build"), nn.Sequential)


def test_factory_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = module_name()
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert isinstance(load_model(f"{name}:build"), nn.Module)
    finally:
        sys.modules.pop(name, None)


def test_factory_from_a_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my models"
    folder.mkdir()
    helper = module_name()
    (folder / f"{helper}.py").write_text("WIDTH = 7\n")
    (folder / "net.py").write_text(
        f"from dataclasses import dataclass\nfrom torch import nn\nfrom {helper} import WIDTH\n\n"
        "@dataclass\nclass Cfg:\n    n: int = WIDTH\n\n"
        "def make(extra=0):\n    return nn.Linear(Cfg().n + extra, 2)\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the file's folder; undo it after
    try:
        model = load_model(f"{folder / 'net.py'}:make", extra=1)
        assert model.in_features == 8
        monkeypatch.chdir(tmp_path)
        assert load_model("my models/net.py:make").in_features == 7
    finally:
        sys.modules.pop(helper, None)


def test_workload_dict_with_iterable_batches(user_module) -> None:  # type: ignore[no-untyped-def]
    name = user_module(FACTORY)
    loaded = load_spec(f"{name}:workload")
    assert loaded.batches is not None and loaded.loss is not None and loaded.val_batches is not None
    assert loaded.task == TaskInfo(kind="vector", in_features=4, num_classes=2)  # inferred from the model
    # step-indexed: repeatable, any order, and the cached epoch repeats after the generator runs out
    assert loaded.batches(1)[0][0, 0] == 1.0 and loaded.batches(0)[0][0, 0] == 0.0
    assert loaded.batches(1) is loaded.batches(1)
    assert loaded.batches(4)[0][0, 0] == 1.0
    value = loaded.loss(loaded.model, loaded.batches(2))
    assert value.ndim == 0 and torch.isfinite(value)
    assert len(list(loaded.val_batches())) == 1 and len(list(loaded.val_batches())) == 1


def test_workload_object_and_explicit_task(user_module) -> None:  # type: ignore[no-untyped-def]
    name = user_module(FACTORY)
    loaded = load_spec(f"{name}:workload", kind="object")
    assert loaded.batches(3)[0][0, 0] == 3 and loaded.val_batches is None
    assert load_spec(f"{name}:workload", kind="task").task == TaskInfo(kind="vector", in_features=4, num_classes=2)
    assert isinstance(load_model(f"{name}:workload"), nn.Linear)


def test_workload_with_a_one_shot_validation_iterator() -> None:
    from muonprof.models.user import Reiterable, StepBatches

    val = Reiterable(iter([1, 2]))
    assert list(val()) == [1, 2] and list(val()) == [1, 2]
    with pytest.raises(ValueError, match="empty"):
        StepBatches([])(0)


@pytest.mark.parametrize(
    ("spec", "overrides", "message"),
    [
        ("no_such_module_xyz:build", {}, r"cannot import 'no_such_module_xyz' \(No module named"),
        ("{mod}:nothing", {}, r"has no attribute 'nothing'"),
        ("{mod}:NOT_CALLABLE", {}, r"NOT_CALLABLE is a int, not callable"),
        ("{mod}:broken", {}, r"broken\(\) raised RuntimeError: no GPU here second line"),
        ("{mod}:build", {"colour": 1}, r"build\(\) raised TypeError: .*colour"),
        ("{mod}:returns_int", {}, r"returns_int\(\) returned int, not an nn.Module or a workload"),
        ("{mod}:workload", {"kind": "missing"}, r"the workload has no loss"),
        ("{mod}:workload", {"kind": "typo"}, r"unknown workload key\(s\) val_batch"),
        ("{mod}:workload", {"kind": "notmodule"}, r"the workload's model is a str, not an nn.Module"),
        ("{mod}:", {}, r"expected package.module:factory"),
    ],
)
def test_bad_factories_are_one_line_errors(user_module, spec: str, overrides: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    spec = spec.format(mod=user_module(FACTORY))
    with pytest.raises(ModelSpecError, match=message) as info:
        load_spec(spec, **overrides)
    assert "\n" not in str(info.value) and spec in str(info.value)


def test_bad_factory_files(tmp_path: Path, user_module) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelSpecError, match=r"cannot import '.*absent.py' \(no such file\)"):
        load_model(f"{tmp_path / 'absent.py'}:build")
    (tmp_path / "bad.py").write_text("def build(:\n")
    with pytest.raises(ModelSpecError, match=r"cannot import .*bad.py' \(SyntaxError"):
        load_model(f"{tmp_path / 'bad.py'}:build")
    name = user_module("import no_such_dependency_xyz\n")
    with pytest.raises(ModelSpecError, match=r"cannot import .* \(No module named 'no_such_dependency_xyz'\)"):
        load_model(f"{name}:build")


# ---------------------------------------------------------------------------------------------- infer_task


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(100, 16)
        self.wpe = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 100)


class LooseParameterViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.fc = nn.Linear(8, 7)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (TinyGPT(), TaskInfo(kind="lm", vocab_size=100, max_seq_len=32)),
        (nn.Sequential(nn.Embedding(10, 4), nn.Embedding(9, 4), nn.Linear(4, 10)), TaskInfo(kind="lm", vocab_size=10)),
        (LooseParameterViT(), TaskInfo(kind="image", image_size=32, channels=1, num_classes=7)),
        (
            nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)),
            TaskInfo(kind="vector", in_features=6, num_classes=2),
        ),
        (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), None),
        (nn.Sequential(nn.ReLU()), None),
    ],
)
def test_infer_task(model: nn.Module, expected: TaskInfo | None) -> None:
    assert infer_task(model) == expected


# ---------------------------------------------------------------------------------------------- hf:PATH


def test_hf_without_transformers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    spec = f"hf:{tmp_path / 'config.json'}"
    with pytest.raises(ModelSpecError, match=r"needs the \[hf\] extra: pip install 'muonprof\[hf\]'"):
        load_model(spec)
    with pytest.raises(ModelSpecError, match=r"needs the \[hf\] extra"):
        load_model(f"hf:{tmp_path}")


def test_hf_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(ModelSpecError, match=r"has no config\.json"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ModelSpecError, match="needs a path"):
        load_model("hf:")


def test_hf_config_and_folder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    config.save_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    loaded = load_spec(f"hf:{tmp_path / 'cfg' / 'config.json'}")
    assert loaded.source == "hf" and loaded.task == TaskInfo(kind="lm", vocab_size=64, max_seq_len=16)
    assert loaded.model(torch.randint(0, 64, (1, 8))).logits.shape == (1, 8, 64)
    torch.manual_seed(0)
    again = load_model(f"hf:{tmp_path / 'cfg'}")  # same seed, no weights: the same random init
    assert torch.equal(again.lm_head.weight, loaded.model.lm_head.weight)

    wider = load_spec(f"hf:{tmp_path / 'cfg'}", width=48, heads=3, seq_len=8)
    assert wider.model.config.n_embd == 48 and wider.task.max_seq_len == 8
    with pytest.raises(ModelSpecError, match="has no attribute 'colour'"):
        load_model(f"hf:{tmp_path / 'cfg'}", colour=1)

    llama = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=1, vocab_size=64
    )
    llama.save_pretrained(tmp_path / "llama")
    model = load_model(f"hf:{tmp_path / 'llama'}", width=64)  # head_dim follows the new width
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    model.save_pretrained(tmp_path / "weights")
    loaded = load_model(f"hf:{tmp_path / 'weights'}")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
