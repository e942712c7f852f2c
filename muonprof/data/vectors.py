"""Vector classification batches for the MLP: a fixed Gaussian-mixture task, learnable but not linear.

Each class owns several clusters in a low-dimensional latent space, embedded in ``in_features`` dimensions
by a fixed random rotation plus ambient noise. Clusters of different classes interleave in the latent space,
so a linear model plateaus well below what an MLP reaches, and the loss curve has the shape of real training.
In many dimensions every labelling of a few dozen cluster centres is linearly separable, hence the latent space.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .corpus import check_positive, step_generator

_TASK_STREAM = 0x7A5C
_TRAIN_STREAM = 0x7EC7
_VAL_STREAM = 0x7A1D

LATENT_DIM = 6
CLUSTERS_PER_CLASS = 4
CLUSTER_SPREAD = 2.0  # std of the cluster centres in the latent space
CLUSTER_NOISE = 0.45  # std of the points around their centre, latent space
AMBIENT_NOISE = 0.3  # std of the isotropic noise in all in_features dimensions


class VectorBatches:
    """``batch(step)`` -> (x float32 (B, in_features), y int64 (B,)), the same for the same (seed, step).

    The task (cluster centres, embedding) depends on (in_features, num_classes) only, never on ``seed``:
    different seeds train the same problem on different samples. Validation batches are fixed too.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        *,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.in_features = check_positive("in_features", in_features)
        self.num_classes = check_positive("num_classes", num_classes)
        self.batch_size = check_positive("batch_size", batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.latent_dim = min(LATENT_DIM, in_features)
        task = step_generator(in_features, num_classes, _TASK_STREAM)
        self._centers = CLUSTER_SPREAD * torch.randn(num_classes, CLUSTERS_PER_CLASS, self.latent_dim, generator=task)
        # Orthonormal rows: the latent space sits in a random latent_dim-dimensional subspace.
        basis, _ = torch.linalg.qr(torch.randn(in_features, self.latent_dim, generator=task))
        self._embed = basis.T.contiguous()  # (latent_dim, in_features)
        # Unit mean feature variance, so default initialisations see inputs of the usual scale.
        variance = self.latent_dim * (CLUSTER_SPREAD**2 + CLUSTER_NOISE**2) / in_features + AMBIENT_NOISE**2
        self._scale = variance**-0.5

    @property
    def description(self) -> str:
        return (
            f"Gaussian mixture, {self.num_classes} classes x {CLUSTERS_PER_CLASS} clusters in a "
            f"{self.latent_dim}-d subspace of {self.in_features}-d, batches of {self.batch_size}"
        )

    def _draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = self.batch_size
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        cluster = torch.randint(0, CLUSTERS_PER_CLASS, (n,), generator=generator)
        latent = self._centers[y, cluster] + CLUSTER_NOISE * torch.randn(n, self.latent_dim, generator=generator)
        x = latent @ self._embed + AMBIENT_NOISE * torch.randn(n, self.in_features, generator=generator)
        x = x * self._scale
        return x.to(self.device), y.to(self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch for ``step``: same (seed, step), same batch."""
        return self._draw(step_generator(self.seed, step, _TRAIN_STREAM))

    def val_batches(self, n_batches: int = 8) -> list[tuple[Tensor, Tensor]]:
        """Fixed validation batches, the same every call and for every seed."""
        check_positive("n_batches", n_batches)
        return [self._draw(step_generator(0, i, _VAL_STREAM)) for i in range(n_batches)]
