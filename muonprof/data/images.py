"""Image classification batches for the ViT and conv nets: procedurally drawn shapes, or sklearn's digits.

Noise images would give the optimizer nothing to learn, so gradient spectra would not look like real
training. The synthetic task draws one shape family per class (disc, square, triangle, plus, ring, stripes
at class-specific orientations, ...) at random position, scale, small rotation, colours and noise: a
convolutional or attention model has to find the shape, a pixel template does not work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .corpus import DataError, check_positive, step_generator

_TRAIN_STREAM = 0x1A6E
_VAL_STREAM = 0x1A7A

SHAPES = (
    "disc",
    "square",
    "triangle",
    "plus",
    "ring",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "x",
    "checkerboard",
    "diamond",
    "frame",
)
"""Class c of the synthetic task draws SHAPES[c]."""


def _shape_distance(shape: int, u: Tensor, v: Tensor, r: Tensor, freq: Tensor, phase: Tensor) -> Tensor:
    """Signed distance-like field, positive inside, in units of the shape's radius ``r``.

    ``u, v`` are the pixel coordinates relative to the shape's centre, rotated and divided by ``r``; the
    periodic patterns use ``u * r`` so their period is set in image units and never aliases.
    """
    rho = torch.sqrt(u * u + v * v)
    if shape == 0:  # disc
        return 1.0 - rho
    if shape == 1:  # square
        return 0.8 - torch.maximum(u.abs(), v.abs())
    if shape == 2:  # triangle, pointing up, centred on its centroid
        w = v + 0.2
        return 0.7 - torch.maximum(u.abs() * 0.866 - w * 0.5, w)
    if shape == 3:  # plus
        return torch.maximum(torch.minimum(0.25 - u.abs(), 1.0 - v.abs()), torch.minimum(0.25 - v.abs(), 1.0 - u.abs()))
    if shape == 4:  # ring
        return 0.2 - (rho - 0.75).abs()
    if 5 <= shape <= 7:  # stripes over the whole image: 0, 90 and 45 degrees
        angle = (0.0, math.pi / 2, math.pi / 4)[shape - 5]
        along = (-u * math.sin(angle) + v * math.cos(angle)) * r
        return torch.sin(freq * along + phase) * 0.3 / r
    if shape == 8:  # x: the plus turned 45 degrees
        a, b = (u + v) * 0.7071, (u - v) * 0.7071
        return torch.maximum(torch.minimum(0.22 - a.abs(), 1.0 - b.abs()), torch.minimum(0.22 - b.abs(), 1.0 - a.abs()))
    if shape == 9:  # checkerboard over the whole image
        return torch.sin(freq * u * r + phase) * torch.sin(freq * v * r + phase) * 0.3 / r
    if shape == 10:  # diamond
        return 1.0 - (u.abs() + v.abs())
    if shape == 11:  # frame (hollow square)
        return 0.18 - (torch.maximum(u.abs(), v.abs()) - 0.7).abs()
    raise AssertionError(shape)


def render_shapes(labels: Tensor, image_size: int, channels: int, generator: torch.Generator) -> Tensor:
    """Images (B, C, H, W), standardised per image, drawing SHAPES[label] with random nuisances.

    All randomness is drawn on the CPU from ``generator`` in a fixed order, so the same generator state
    gives the same images anywhere. Vectorised over the batch: one pass per class present.
    """
    n, size = labels.numel(), image_size
    center = (torch.rand(n, 2, generator=generator) - 0.5) * 0.7
    radius = 0.35 + 0.3 * torch.rand(n, generator=generator)
    theta = (torch.rand(n, generator=generator) - 0.5) * math.radians(24)
    freq = 2 * math.pi * (1.5 + 1.5 * torch.rand(n, generator=generator))  # stripes per half image
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    fg = torch.rand(n, channels, generator=generator)
    # Background at least 0.3 away from the foreground in every channel, so the shape is always visible.
    bg = torch.remainder(fg + 0.3 + 0.4 * torch.rand(n, channels, generator=generator), 1.0)
    gradient = (torch.rand(n, 2, generator=generator) - 0.5) * 0.3  # uneven lighting
    noise = torch.randn(n, channels, size, size, generator=generator) * 0.08

    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    mask = torch.empty(n, size, size)
    sharp = size / 2  # edges about one pixel wide whatever the resolution
    for shape in labels.unique().tolist():
        idx = (labels == shape).nonzero().squeeze(1)
        cx, cy = center[idx, 0, None, None], center[idx, 1, None, None]
        r, cos, sin = radius[idx, None, None], theta[idx].cos()[:, None, None], theta[idx].sin()[:, None, None]
        dx, dy = gx - cx, gy - cy
        u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
        dist = _shape_distance(shape, u, v, r, freq[idx, None, None], phase[idx, None, None])
        mask[idx] = torch.sigmoid(dist * r * sharp)
    mask = mask[:, None]
    light = 1 + gradient[:, 0, None, None, None] * gx + gradient[:, 1, None, None, None] * gy
    images = (fg[:, :, None, None] * mask + bg[:, :, None, None] * (1 - mask)) * light + noise
    flat = images.flatten(1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-3)
    return (images - mean[:, None, None, None]) / std[:, None, None, None]


class ImageBatches:
    """``batch(step)`` -> (x float32 (B, C, H, W), y int64 (B,)), the same for the same (seed, step).

    ``source="synthetic"``: the shapes task above, up to ``len(SHAPES)`` classes, any size and channels.
    ``source="digits"``: scikit-learn's bundled 8x8 handwritten digits (no download), upsampled to
    ``image_size``; every sixth image is held out for validation. Validation batches do not depend on
    ``seed`` so runs with different seeds compare.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 10,
        *,
        batch_size: int,
        seed: int = 0,
        source: str = "synthetic",
        device: str | torch.device = "cpu",
    ) -> None:
        self.image_size = check_positive("image_size", image_size)
        self.channels = check_positive("channels", channels)
        self.num_classes = check_positive("num_classes", num_classes)
        self.batch_size = check_positive("batch_size", batch_size)
        self.seed = int(seed)
        self.source = source
        self.device = torch.device(device)
        if source == "synthetic":
            if image_size < 8:
                raise DataError(f"synthetic images need image_size >= 8 to draw shapes, got {image_size}")
            if num_classes > len(SHAPES):
                raise DataError(
                    f"synthetic images have {len(SHAPES)} shape classes, {num_classes} asked: "
                    f"pass num_classes <= {len(SHAPES)}"
                )
            self._digits: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        elif source == "digits":
            if num_classes != 10:
                raise DataError(f"digits have 10 classes, {num_classes} asked: pass num_classes=10")
            self._digits = _load_digits(image_size, channels)
        else:
            raise DataError(f"unknown image source {source!r}: pass 'synthetic' or 'digits'")

    @property
    def description(self) -> str:
        what = (
            f"synthetic shapes ({self.num_classes} classes)"
            if self._digits is None
            else "scikit-learn digits (8x8 upsampled)"
        )
        return f"{what}, {self.channels}x{self.image_size}x{self.image_size}, batches of {self.batch_size}"

    def _draw(self, generator: torch.Generator, train: bool) -> tuple[Tensor, Tensor]:
        if self._digits is None:
            y = torch.randint(0, self.num_classes, (self.batch_size,), generator=generator)
            x = render_shapes(y, self.image_size, self.channels, generator)
        else:
            images, labels = self._digits[:2] if train else self._digits[2:]
            pick = torch.randint(0, labels.numel(), (self.batch_size,), generator=generator)
            x, y = images[pick], labels[pick]
        return x.to(self.device), y.to(self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch for ``step``: same (seed, step), same batch."""
        return self._draw(step_generator(self.seed, step, _TRAIN_STREAM), train=True)

    def val_batches(self, n_batches: int = 8) -> list[tuple[Tensor, Tensor]]:
        """Fixed validation batches (held-out images for digits), the same every call."""
        check_positive("n_batches", n_batches)
        return [self._draw(step_generator(0, i, _VAL_STREAM), train=False) for i in range(n_batches)]


def _load_digits(image_size: int, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, val images, val labels), standardised, from sklearn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "source 'digits' needs scikit-learn (pip install scikit-learn), or pass source='synthetic'"
        ) from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1)
    images = ((images - images.mean()) / images.std()).contiguous()
    held_out = torch.arange(labels.numel()) % 6 == 5
    return images[~held_out], labels[~held_out], images[held_out], labels[held_out]
