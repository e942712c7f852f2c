"""Depthwise convs (``groups == in_channels``) route as README's policy says: Muon, as a (C, k*k) matrix, with a
reason of their own in ``describe()``; a profile can send them to AdamW."""

from __future__ import annotations

import math

import torch
from torch import nn

from muonprof import ProfiledMuon
from muonprof.optim.routing import DEPTHWISE, route_module
from muonprof.roles import classify_roles


class Separable(nn.Module):
    """Stem, a depthwise 3x3, a grouped (not depthwise) 3x3, a pointwise 1x1, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.grouped(self.dw(self.stem(x).relu()).relu()).relu())
        return self.head(x.mean((2, 3)))


def test_depthwise_conv_goes_to_muon_with_its_own_reason_traced_or_not() -> None:
    model = Separable()
    example = (torch.randn(2, 3, 8, 8),)
    for opt in (ProfiledMuon(model), ProfiledMuon(model, example_inputs=example)):
        rows = {row["name"]: row for row in opt.describe()}
        dw = rows["dw.weight"]
        assert (dw["optimizer"], dw["reason"]) == ("muon", DEPTHWISE)
        assert dw["lr_factor"] == math.sqrt(16 / 9)  # Jordan's rule on the (16, 9) matrix Muon sees
        assert (rows["grouped.weight"]["optimizer"], rows["grouped.weight"]["reason"]) == ("muon", "conv (flattened)")
        assert rows["pw.weight"]["reason"] == "conv (flattened)"
        assert rows["stem.weight"]["optimizer"] == rows["head.weight"]["optimizer"] == "adamw"
    assert route_module(model)["dw.weight"] == ("muon", DEPTHWISE)
    assert classify_roles(model)["dw.weight"] == "conv"


def test_a_profile_sends_depthwise_convs_to_adamw() -> None:
    model = Separable()
    profile = {"format": "muonprof.profile/1", "layers": {"dw.weight": {"optimizer": "adamw", "lr_scale": 10.0}}}
    rows = {row["name"]: row for row in ProfiledMuon(model, profile).describe()}
    assert (rows["dw.weight"]["optimizer"], rows["dw.weight"]["reason"]) == ("adamw", "profile")
    assert rows["grouped.weight"]["optimizer"] == "muon"
