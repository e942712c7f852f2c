"""A small depthwise-separable CNN (MobileNet-style) for measuring how depthwise convs should be routed.

``muonprof validate tests/benchmarks/dwconv_model.py:build`` trains it on muonprof's synthetic shape images
(``--data synthetic``; the factory tags the model with its image task, so the data pipeline needs no hints).
Each block is a depthwise 3x3 conv (``groups == channels``: Muon sees its weight as a (C, 9) matrix, whose
Jordan lr factor ``sqrt(C / 9)`` grows with the width) followed by a pointwise 1x1 conv (a (C_out, C_in) channel
map, an ordinary hidden matrix). ``depthwise_names`` lists the depthwise weights, so a script can write the
profile that overrides their routing (see README.md, "depthwise convs").
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from muonprof.models.task import TaskInfo


class SeparableBlock(nn.Module):
    """Depthwise 3x3 (per-channel filters) -> BN -> ReLU -> pointwise 1x1 (channel map) -> BN -> ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels_in, channels_in, 3, stride=stride, padding=1, groups=channels_in, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.pw = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.dw(x)).relu()
        return self.bn2(self.pw(x)).relu()


class SeparableCNN(nn.Module):
    """Stem conv, ``len(widths) - 1`` separable blocks (stride 2 from the second on), pooled linear head."""

    def __init__(self, widths: tuple[int, ...], image_size: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        self.blocks = nn.Sequential(
            *(SeparableBlock(a, b, 1 if i == 0 else 2) for i, (a, b) in enumerate(itertools.pairwise(widths)))
        )
        self.head = nn.Linear(widths[-1], num_classes)
        self.muonprof_task = TaskInfo(kind="image", image_size=image_size, channels=3, num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x).relu())
        return self.head(x.mean((2, 3)))


def build(width: int = 32, depth: int = 4, image_size: int = 16, num_classes: int = 10) -> SeparableCNN:
    """``depth`` separable blocks, the width doubling each block from ``width`` (default 32 -> 512).

    With the defaults the depthwise weights are (32|64|128|256, 9) matrices: Jordan lr factors 1.9 to 5.3.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
    widths = tuple(width * 2**i for i in range(depth + 1))
    return SeparableCNN(widths, image_size, num_classes)


def depthwise_names(model: nn.Module) -> list[str]:
    """The weight names of the depthwise convs (``groups == in_channels > 1``)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
    ]


def adamw_profile(lr_scale: float = 1.0, **overrides: int) -> dict[str, object]:
    """A profile that sends ``build(**overrides)``'s depthwise convs to AdamW (its lr x ``lr_scale``), the rest as
    routed: ``validate --profile`` then races depthwise -> AdamW against the default (depthwise -> Muon)."""
    if lr_scale <= 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    layers = {name: {"optimizer": "adamw", "lr_scale": lr_scale} for name in depthwise_names(build(**overrides))}
    return {"format": "muonprof.profile/1", "layers": layers}


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.benchmarks.dwconv_model OUT.json [--lr-scale X]``: write ``adamw_profile``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--lr-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        profile = adamw_profile(args.lr_scale)
    except ValueError as err:
        parser.error(str(err))
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(profile, fh, indent=1)
    print(f"wrote {args.out}: {len(profile['layers'])} depthwise convs -> AdamW (lr x {args.lr_scale:g})")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
