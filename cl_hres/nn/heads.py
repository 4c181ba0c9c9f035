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
        """Classes the statistics cover so far."""
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

    def statistics(self) -> dict[str, torch.Tensor]:
        """The accumulated sufficient statistics (summed across processes)."""
        return {"class_sums": self.class_sums, "class_counts": self.class_counts}

    @torch.no_grad()
    def update(
        self, features: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor | None = None
    ) -> None:
        """Adds a batch of features ``(B, D)`` with integer labels ``(B,)``.

        Args:
            features: The features.
            labels: Their classes.
            class_counts: Images per class of the whole experience this batch belongs to
                (all processes together); read by heads that balance classes.
        """
        if labels.numel() == 0:
            return
        self._grow(int(labels.max().item()) + 1)
        self._add(features.double(), labels, torch.ones_like(labels, dtype=torch.float64))

    def _add(self, f: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        self.class_sums.index_add_(0, labels, f * weights.unsqueeze(1))
        self.class_counts.index_add_(0, labels, weights)

    def fit(self) -> None:
        """Recomputes the classifier from the statistics (after a round of updates)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Logits ``(B, C)`` of the features."""
        raise NotImplementedError


class NCMHead(StatisticsHead):
    """Cosine similarity to each class mean; classes never seen score -inf."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every class mean; classes never seen score -inf."""
        means = self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)
        means = nn.functional.normalize(means.to(features.dtype), dim=1)
        logits = nn.functional.normalize(features, dim=1) @ means.T
        return logits.masked_fill(self.class_counts == 0, float("-inf"))


class RidgeHead(StatisticsHead):
    """Closed-form ridge classifier ``W = (G + λ·tr(G)/D·I)⁻¹ Q``.

    With ``projection`` = M > 0, features first go through a fixed random map
    ``ReLU(R·φ)`` to M dimensions (RanPAC's random projection), which adds capacity to a
    linear classifier on statistics alone. The map is drawn from its own seeded generator,
    so it does not consume the global RNG.

    Args:
        num_features: Feature width D of the backbone.
        ridge: λ relative to the mean eigenvalue tr(G)/D, so it needs no rescaling
            between backbones. ``None`` (default) chooses it at every fit by generalised
            cross-validation (GCV) over 1e-8 … 1e1, computed from the statistics alone.
        projection: Width M of the random ReLU projection; 0 disables it.
        seed: Seed of the projection.
        balanced: Weight every class as if it had the same number of images, ``m``: an
            image of a class with ``n_c`` images counts ``m / n_c`` in the Gram matrix,
            the class sums and the counts (so the bias's prior is uniform too). ``m`` is
            the mean class size of the first experience, fixed from then on, so the
            GCV's sample count stays the right order. Without it, a class of a small
            experience holds a small share of ``G`` and its scores shrink (RanPAC and
            the ridge heads of the field weight by images).
    """

    def __init__(
        self,
        num_features: int,
        ridge: float | None = None,
        projection: int = 0,
        seed: int = 0,
        balanced: bool = False,
    ) -> None:
        width = projection or num_features
        super().__init__(width)
        self.ridge = ridge
        self.balanced = balanced
        self.register_buffer("balance_count", torch.zeros((), dtype=torch.float64))
        self.input_features = num_features
        if projection:
            gen = torch.Generator().manual_seed(seed)
            rp = torch.randn(projection, num_features, generator=gen) / num_features**0.5
            self.register_buffer("projection", rp)
        else:
            self.projection = None
        self.register_buffer("gram", torch.zeros(width, width, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, width))
        self.register_buffer("bias", torch.zeros(0))

    def _lift(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return features
        return torch.relu(features @ self.projection.to(features.dtype).T)

    def statistics(self) -> dict[str, torch.Tensor]:
        """The class statistics and the Gram matrix (summed across processes)."""
        return dict(super().statistics(), gram=self.gram)

    @torch.no_grad()
    def update(
        self, features: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor | None = None
    ) -> None:
        """Adds a batch to the class sums and the Gram matrix (see the base class)."""
        if labels.numel() == 0:
            return
        self._grow(int(labels.max().item()) + 1)
        f = self._lift(features).double()
        weights = torch.ones_like(labels, dtype=torch.float64)
        if self.balanced:
            if class_counts is None:
                class_counts = torch.bincount(labels, minlength=self.num_classes)
            counts = class_counts.to(f.device, torch.float64)
            if self.balance_count == 0:
                self.balance_count.fill_(counts[counts > 0].mean())
            weights = self.balance_count / counts[labels]
        self._add(f, labels, weights)
        self.gram += (f * weights.unsqueeze(1)).T @ f

    GRID = tuple(10.0**k for k in range(-8, 2))

    @torch.no_grad()
    def fit(self) -> None:
        """Solves the ridge classifier from the statistics (λ by GCV unless fixed)."""
        d = self.num_features
        # Centre with the global mean and add a bias, so features with a large common
        # offset do not dominate the ridge penalty.
        n = self.class_counts.sum().clamp_min(1)
        mean = self.class_sums.sum(0) / n
        gram = self.gram - n * torch.outer(mean, mean)
        # Q = Σ φ yᵀ for one-hot y is the per-class sums; centred likewise.
        q = self.class_sums.T - torch.outer(mean, self.class_counts)
        evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
        evals = evals.clamp_min(0)
        scale = evals.sum().clamp_min(1e-12) / d
        b = evecs.T @ q  # (D, C): Q in the eigenbasis
        b2 = (b**2).sum(1)
        y2 = n - (self.class_counts**2).sum() / n  # ‖Y − ȳ‖² for one-hot targets
        if self.ridge is None:
            # GCV(λ) = n·RSS(λ) / (n − df(λ) − 1)², every term from G and Q.
            best = None
            for rel in self.GRID:
                lam = rel * scale
                rss = y2 - 2 * (b2 / (evals + lam)).sum() + (evals * b2 / (evals + lam) ** 2).sum()
                df = (evals / (evals + lam)).sum()
                gcv = float(n * rss / (n - df - 1).clamp_min(1e-12) ** 2)
                if best is None or gcv < best[0]:
                    best = (gcv, rel)
            self.chosen_ridge = best[1]
        else:
            self.chosen_ridge = self.ridge
        lam = self.chosen_ridge * scale
        w = evecs @ (b / (evals + lam).unsqueeze(1))  # (D, C) = (G + λI)⁻¹ Q
        prior = self.class_counts / n
        self.weight = w.T.float().contiguous()
        self.bias = (prior - mean @ w).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Ridge logits; classes never seen score -inf."""
        features = self._lift(features)
        logits = features @ self.weight.to(features.dtype).T + self.bias.to(features.dtype)
        return logits.masked_fill(self.class_counts == 0, float("-inf"))
