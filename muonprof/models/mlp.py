"""The smallest built-in: an MLP classifier on vectors, for quick checks of the whole pipeline.

It stays an ``nn.Sequential`` so its parameter names (``0.weight`` ... ``6.weight``) are stable: saved
profiles and the CLI tests name layers that way. The last Linear is the head (routing's last-Linear rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .task import TaskInfo


@dataclass(frozen=True)
class MLPConfig:
    width: int = 256
    depth: int = 3
    inputs: int = 64
    classes: int = 10

    def validate(self) -> None:
        """Sizes are checked positive by the registry; any combination of them is a valid MLP."""


ALIASES = {"in_features": "inputs", "num_classes": "classes"}

CONFIGS: dict[str, tuple[MLPConfig, str]] = {
    "mlp": (MLPConfig(), "MLP classifier: 64 inputs, 3 hidden layers of 256, 10 classes"),
}


def build(cfg: MLPConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(cfg.inputs, cfg.width), nn.GELU()]
    for _ in range(cfg.depth - 1):
        layers += [nn.Linear(cfg.width, cfg.width), nn.GELU()]
    layers.append(nn.Linear(cfg.width, cfg.classes))
    return nn.Sequential(*layers)


def task_info(cfg: MLPConfig) -> TaskInfo:
    return TaskInfo(kind="vector", in_features=cfg.inputs, num_classes=cfg.classes)
