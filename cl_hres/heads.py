"""Class-incremental heads fitted from accumulated feature statistics.

Both heads keep only sufficient statistics (no exemplars), so they can be updated one
experience at a time and grow with the number of classes:

* :class:`RidgeHead`: closed-form ridge regression on one-hot targets from the Gram matrix
  ``G = Σ φφᵀ`` and ``Q = Σ φ yᵀ`` (the classifier of RanPAC, without its random
  projection). If old features do not move (NSP), the result equals a ridge head fitted
  jointly on all data seen.
* :class:`NCMHead`: nearest class mean under cosine similarity (prototype classifier).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NCMHead", "RidgeHead", "StatisticsHead"]


class StatisticsHead(nn.Module):
    """Base: per-class statistics in float64 buffers, grown on demand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("class_sums", torch.zeros(0, num_features, dtype=torch.float64))
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.class_sums.shape[0]

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        dev = self.class_sums.device
        self.class_sums = torch.cat(
            [
                self.class_sums,
                torch.zeros(extra, self.num_features, dtype=torch.float64, device=dev),
            ]
        )
        self.class_counts = torch.cat(
            [self.class_counts, torch.zeros(extra, dtype=torch.float64, device=dev)]
        )

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch of features ``(B, D)`` with integer labels ``(B,)``."""
        self._grow(int(labels.max().item()) + 1)
        f = features.double()
        self.class_sums.index_add_(0, labels, f)
        self.class_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def fit(self) -> None:
        """Recomputes the classifier from the statistics (after a round of updates)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class NCMHead(StatisticsHead):
    """Cosine similarity to each class mean; classes never seen score -inf."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        means = self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)
        means = nn.functional.normalize(means.to(features.dtype), dim=1)
        logits = nn.functional.normalize(features, dim=1) @ means.T
        return logits.masked_fill(self.class_counts == 0, float("-inf"))


class RidgeHead(StatisticsHead):
    """Closed-form ridge classifier ``W = (G + λ·tr(G)/D·I)⁻¹ Q``.

    Args:
        num_features: Feature width D.
        ridge: λ relative to the mean eigenvalue tr(G)/D, so it needs no rescaling
            between backbones.
    """

    def __init__(self, num_features: int, ridge: float = 1e-2) -> None:
        super().__init__(num_features)
        self.ridge = ridge
        self.register_buffer("gram", torch.zeros(num_features, num_features, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, num_features))
        self.register_buffer("bias", torch.zeros(0))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(features, labels)
        f = features.double()
        self.gram += f.T @ f

    @torch.no_grad()
    def fit(self) -> None:
        d = self.num_features
        # Centre with the global mean and add a bias, so features with a large common
        # offset do not dominate the ridge penalty.
        n = self.class_counts.sum().clamp_min(1)
        mean = self.class_sums.sum(0) / n
        gram = self.gram - n * torch.outer(mean, mean)
        lam = self.ridge * gram.diagonal().sum().clamp_min(1e-12) / d
        eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
        # Q = Σ φ yᵀ for one-hot y is the per-class sums; centred likewise.
        q = self.class_sums.T - torch.outer(mean, self.class_counts)
        w = torch.linalg.solve(gram + lam * eye, q)  # (D, C)
        prior = self.class_counts / n
        self.weight = w.T.float().contiguous()
        self.bias = (prior - mean @ w).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features @ self.weight.to(features.dtype).T + self.bias.to(features.dtype)
        return logits.masked_fill(self.class_counts == 0, float("-inf"))
