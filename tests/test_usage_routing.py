"""Routing from one traced forward pass (``ProfiledMuon(model, example_inputs=...)``) on third-party-shaped models.

Each model below is built the way a library builds it (timm, DeiT, vit-pytorch, ConvNets with a 1x1-conv
classifier, a conv mixing layer after an embedding), where routing from the module tree alone gets it wrong: the
test states what the documented policy says (README, "Routing") and checks the module-tree guess differs where the
issue found a defect, so the trace is what fixes it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from muonprof import ProfiledMuon
from muonprof.optim.routing import route_module
from muonprof.optim.usage import trace_parameter_use

D = 16


def _routes(model: nn.Module, example: object) -> dict[str, str]:
    return {r["name"]: r["optimizer"] for r in ProfiledMuon(model, example_inputs=example).describe()}


def _guessed(model: nn.Module) -> dict[str, str]:
    return {name: route for name, (route, _) in route_module(model).items()}


class LateStem(nn.Module):
    """The stem is registered after the body (as in some ResNet ports): the first registered conv is hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_the_stem_is_the_conv_the_input_meets_not_the_first_registered() -> None:
    model, x = LateStem(), torch.randn(2, 3, 8, 8)
    routes = _routes(model, x)
    assert routes["stem.weight"] == "adamw" and routes["fc.weight"] == "adamw"
    assert routes["body.0.weight"] == "muon" and routes["body.2.weight"] == "muon"
    assert _guessed(model)["body.0.weight"] == "adamw" and _guessed(model)["stem.weight"] == "muon"  # the defect


class EmbeddingThenConv(nn.Module):
    """A 1x1 Conv1d mixing channels after an embedding (a conv LM): hidden, not a stem."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.mix = nn.Conv1d(D, D, 1)
        self.hidden = nn.Linear(D, D)
        self.out = nn.Linear(D, 50)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.mix(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.hidden(x)))


def test_a_conv_after_an_embedding_is_hidden() -> None:
    model = EmbeddingThenConv()
    routes = _routes(model, torch.randint(0, 50, (2, 6)))
    assert routes["mix.weight"] == "muon" and routes["hidden.weight"] == "muon"
    assert routes["emb.weight"] == "adamw" and routes["out.weight"] == "adamw"
    assert _guessed(model)["mix.weight"] == "adamw"  # the defect: taken for the stem


class DeiTLike(nn.Module):
    """DeiT: class and distillation tokens under their own names, a positional table named ``pe``, two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, D, 4, 4)
        self.cls_tok = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pe = nn.Parameter(torch.randn(6, D) * 0.02)  # (tokens, D): a table, not a matrix
        self.blocks = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, 10)
        self.head_dist = nn.Linear(D, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls_tok.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1) + self.pe
        x = x + self.blocks(x)
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def test_two_heads_tokens_and_an_odd_positional_table() -> None:
    model = DeiTLike()
    routes = _routes(model, torch.randn(2, 3, 8, 8))
    for name in ("patch_embed.weight", "cls_tok", "dist_token", "pe", "head.weight", "head_dist.weight"):
        assert routes[name] == "adamw", name
    assert routes["blocks.0.weight"] == "muon" and routes["blocks.2.weight"] == "muon"
    guessed = _guessed(model)
    assert guessed["head_dist.weight"] == "muon" and guessed["pe"] == "muon"  # the defects


class ConvClassifier(nn.Module):
    """A 1x1-conv classifier then global pooling (SqueezeNet, NiN, many segmentation heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.classifier = nn.Conv2d(8, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x)).mean((2, 3))


def test_a_1x1_conv_classifier_is_an_output_layer() -> None:
    model = ConvClassifier()
    routes = _routes(model, torch.randn(2, 3, 10, 10))
    assert routes["classifier.weight"] == "adamw" and routes["features.0.weight"] == "adamw"
    assert routes["features.2.weight"] == "muon"
    assert _guessed(model)["classifier.weight"] == "muon"  # the defect


class LinearPatchViT(nn.Module):
    """vit-pytorch's patch embedding: rearrange, LayerNorm, then a Linear: the input layer is a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3 * 4 * 4)
        self.to_patch = nn.Linear(3 * 4 * 4, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.time_embedding = nn.Parameter(torch.randn(5, D) * 0.02)
        self.mlp_head = nn.Linear(D, 10)

    def forward(self, img: Tensor, t: Tensor) -> Tensor:
        b = img.shape[0]
        patches = img.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * 4 * 4)
        x = self.to_patch(self.norm(patches)) + self.time_embedding[t][:, None, :]
        return self.mlp_head((x + self.mlp(x)).mean(1))


def test_a_linear_patch_embedding_is_the_input_layer_and_an_indexed_table_is_a_table() -> None:
    model = LinearPatchViT()
    routes = _routes(model, (torch.randn(2, 3, 8, 8), torch.tensor([0, 3])))
    assert routes["to_patch.weight"] == "adamw" and routes["time_embedding"] == "adamw"
    assert routes["mlp.0.weight"] == "muon" and routes["mlp.2.weight"] == "muon"
    assert routes["mlp_head.weight"] == "adamw"
    assert _guessed(model)["to_patch.weight"] == "muon"  # the defect


@pytest.mark.parametrize("name", ["gpt2-tiny", "vit-tiny", "llama-20m"])
def test_built_in_models_route_the_same_traced_or_not(name: str) -> None:
    """The module tree already routes the built-ins right: tracing their loss must agree everywhere."""
    from muonprof.workload import build_workload

    lm = "vit" not in name
    workload = build_workload(name, batch_size=2, seq_len=16 if lm else None, data="random" if lm else None)
    batch = workload.train_batch(0)
    uses = trace_parameter_use(workload.model, lambda: workload.loss(batch))
    traced = {name: route for name, (route, _) in route_module(workload.model, uses).items()}
    assert traced == _guessed(workload.model)


def test_tracing_leaves_the_model_and_the_rng_as_they_were() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    stats = model[1].running_mean.clone()
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    uses = trace_parameter_use(model, lambda: model(x + 0 * torch.randn(3, 4)))  # the closure draws: restored
    assert model.training and torch.equal(model[1].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert uses["0.weight"].input_layer and uses["3.weight"].output_layer
    assert (uses["0.weight"].order, uses["3.weight"].order) == (0, 1)
    assert not uses["0.weight"].output_layer and not uses["3.weight"].input_layer


def test_example_inputs_need_a_module() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        ProfiledMuon([("w", nn.Parameter(torch.zeros(4, 4)))], example_inputs=torch.zeros(1, 4))


def test_hf_gpt2_traced_routing_agrees_with_the_module_tree() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    traced = _routes(model, torch.randint(0, 64, (2, 8)))
    assert traced == _guessed(model)
    assert traced["transformer.h.0.mlp.c_fc.weight"] == "muon" and traced["transformer.wte.weight"] == "adamw"
