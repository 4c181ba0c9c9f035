"""The projector onto the approximate null space of the old inputs' second moment."""

from __future__ import annotations

import torch

from cl_hres.nsp.config import NullSpaceConfig

__all__ = ["null_space_projector"]

# Eigenvalues below this share of the largest count as zero for the ``ratio`` rule.
_EIG_FLOOR = 1e-12


def null_space_projector(sigma: torch.Tensor, config: NullSpaceConfig) -> tuple[torch.Tensor, int]:
    """Projector onto the approximate null space of a symmetric PSD matrix.

    One rule for the edge cases, whatever ``config.rule``: an all-zero ``sigma`` (no old
    input energy) protects nothing, ``P = I`` and k = d; any other ``sigma`` protects at
    least its leading eigenvector, so k < d, and a spectrum without a "small" eigenvalue
    gives ``P = 0`` (k = 0). For ``ratio`` this means that a spectrum flat within the
    factor ``threshold`` (cond(Σ) ≤ a) is protected entirely instead of not at all.

    Args:
        sigma: ``(d, d)`` second-moment matrix (any float dtype; solved in float64).
        config: Threshold rule, its parameter and the relaxation η.

    Returns:
        ``(P, k)``: the float64 ``(d, d)`` projector ``η·U₀U₀ᵀ + (1 − η)·I`` and the
        null-space dimension k (columns of U₀).
    """
    s = sigma.double()
    s = (s + s.T) / 2
    d = s.shape[0]
    evals, evecs = torch.linalg.eigh(s)  # ascending
    evals = evals.clamp_min(0)
    lam_max = evals[-1]
    if not bool(lam_max > 0):
        null_mask = torch.ones_like(evals, dtype=torch.bool)
    elif config.rule == "energy":
        # Protect the fewest leading eigenvectors whose energy reaches the threshold.
        desc = evals.flip(0)
        cum = desc.cumsum(0) / desc.sum()
        target = torch.tensor(config.threshold, dtype=cum.dtype, device=cum.device)
        protected = int(torch.searchsorted(cum, target).item()) + 1
        null_mask = torch.zeros_like(evals, dtype=torch.bool)
        null_mask[: max(0, d - protected)] = True
    elif config.rule == "ratio":
        lam_min = torch.maximum(evals[0], lam_max * _EIG_FLOOR)
        null_mask = evals <= config.threshold * lam_min
        if bool(null_mask.all()):
            # cond(Σ) ≤ a: no eigenvalue stands out as small; every direction carries old
            # inputs, so all are protected.
            null_mask = torch.zeros_like(null_mask)
    else:  # relative; λ_max itself is never below threshold·λ_max (threshold < 1)
        null_mask = evals <= config.threshold * lam_max
    u0 = evecs[:, null_mask]
    proj = u0 @ u0.T
    if config.eta < 1:
        eye = torch.eye(d, dtype=s.dtype, device=s.device)
        proj = config.eta * proj + (1 - config.eta) * eye
    return proj, int(u0.shape[1])
