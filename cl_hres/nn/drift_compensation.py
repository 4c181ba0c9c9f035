"""Compensating stored class statistics for the drift of the features (no exemplars).

A statistics head (ridge, NCM) keeps sums of the features of data it will never see
again. When training an experience moves the features, those sums go stale: old classes
are scored with where their features *were*. Following learnable drift compensation
(Gomez-Villa et al., ECCV 2024) and semantic drift compensation (Yu et al., CVPR 2020),
the drift is estimated on the data that *is* available, the current experience's, as an
affine map ``f_after ≈ M·f_before + b`` fitted by ridge regression towards the identity,
and applied to the old statistics in closed form:

* class sums ``S_c ← M·S_c + n_c·b``,
* Gram matrix ``G ← M·G·Mᵀ + M·s·bᵀ + b·sᵀ·Mᵀ + n·b·bᵀ`` with ``s = Σ_c S_c``.

Both are exact when the map is exact. Heads with a random ReLU projection are nonlinear in
the features and cannot be mapped this way (their statistics stay as they are).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cl_hres import distributed

__all__ = ["DriftEstimator", "compensate_head", "compensate_heads"]


class DriftEstimator:
    """Accumulates ``XᵀX`` and ``XᵀY`` of paired features (before, after) in float64.

    Args:
        num_features: Feature width D.
        ridge: Penalty towards the identity map, relative to the mean eigenvalue of
            ``XᵀX`` (so it needs no rescaling between backbones).
        device: Where the sums live (the model's device).
    """

    def __init__(self, num_features: int, *, ridge: float = 1e-3, device=None) -> None:
        self.d = num_features
        self.ridge = ridge
        self.xtx = torch.zeros(self.d + 1, self.d + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(self.d + 1, self.d, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Adds a batch of the same images' features before and after training."""
        x = torch.cat([before.double(), before.new_ones(len(before), 1).double()], 1)
        self.xtx += x.T @ x
        self.xty += x.T @ after.double()

    def combine_ranks(self) -> None:
        """Sums the statistics over the processes of a distributed run."""
        distributed.all_reduce_(self.xtx)
        distributed.all_reduce_(self.xty)

    @torch.no_grad()
    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, b)`` minimising ``‖X·[Mᵀ; bᵀ] − Y‖² + λ‖M − I‖² + λ‖b‖²``."""
        d = self.d
        lam = self.ridge * torch.diagonal(self.xtx)[:d].sum().clamp_min(1e-12) / d
        prior = torch.zeros(d + 1, d, dtype=torch.float64, device=self.xtx.device)
        prior[:d] = torch.eye(d, dtype=torch.float64, device=self.xtx.device)
        a = self.xtx + lam * torch.eye(d + 1, dtype=torch.float64, device=self.xtx.device)
        w = torch.linalg.solve(a, self.xty + lam * prior)  # (D+1, D)
        return w[:d].T.contiguous(), w[d].contiguous()


@torch.no_grad()
def compensate_head(head: torch.nn.Module, m: torch.Tensor, b: torch.Tensor) -> bool:
    """Maps a statistics head's sums through ``f ↦ M·f + b``; False if it cannot."""
    if getattr(head, "projection", None) is not None:
        return False
    counts = head.class_counts
    sums = head.class_sums  # (C, D)
    total = sums.sum(0)
    head.class_sums = sums @ m.T + counts.unsqueeze(1) * b
    gram = getattr(head, "gram", None)
    if gram is not None:
        n = counts.sum()
        ms = m @ total
        head.gram = m @ gram @ m.T + torch.outer(ms, b) + torch.outer(b, ms) + n * torch.outer(b, b)
    return True


def compensate_heads(
    heads: Iterable[torch.nn.Module], before: torch.Tensor, after: torch.Tensor
) -> None:
    """Maps every head's statistics through the drift from ``before`` to ``after``.

    Args:
        heads: Statistics heads (their stored sums and Gram matrices are rewritten).
        before: Features ``(N, D)`` of the experience's images before training on it.
        after: The same images' features after training.
    """
    estimator = DriftEstimator(before.shape[1], device=before.device)
    estimator.update(before, after)
    estimator.combine_ranks()
    m, b = estimator.solve()
    for head in heads:
        compensate_head(head, m, b)
