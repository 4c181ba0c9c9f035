"""Null-space projection (NSP): covariance of old inputs, projectors, enforcement.

The maths is in ``shared/notes/method.md``. For each expert bank we keep the uncentred
second moment of its input over all old experiences, split into token groups (prefix
cls/register tokens and patch tokens). Each group is normalised by its trace before the
groups are summed, so the small-norm cls token is protected as well as the patch tokens.
The projector onto the span of "small" eigenvectors keeps every new expert's ``down``
rows in the null space; then ``down · x_old ≈ 0`` and the new expert adds nothing to old
inputs, block after block.

Everything stays on the model's device: accumulation is one matmul per batch and group,
projection one matmul per weight; no value is read back to the host during training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from cl_hres import distributed
from cl_hres.config import NullSpaceConfig
from cl_hres.experts import ExpertBank

__all__ = [
    "CovarianceAccumulator",
    "NullSpaceGuard",
    "null_space_projector",
]

_EIG_FLOOR = 1e-12


class CovarianceAccumulator:
    """Streaming ``Σ x xᵀ`` per token group, accumulated in float64 on ``device``.

    The running sum is float64, so rounding does not grow with the number of tokens. Each
    batch's product ``XᵀX`` is computed in ``precision``: float64 by default, because a
    float32 product has a noise floor near 1e-8·λ_max that hides genuine small directions
    of the old inputs (attention outputs have eigenvalues down to ~1e-9·λ_max); float32 is
    faster on GPUs without fast float64 and is fine with a looser threshold.

    Args:
        dim: Feature width d.
        num_prefix_tokens: Leading tokens that form the prefix group.
        separate_prefix: If False, one group holds all tokens.
        device: Where the statistics live (the model's device).
        precision: ``"float64"`` or ``"float32"`` for each batch's product.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_prefix_tokens: int = 0,
        separate_prefix: bool = True,
        device: torch.device | str = "cpu",
        precision: str = "float64",
    ) -> None:
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be float64 or float32, got {precision!r}")
        self.dim = dim
        self.dtype = getattr(torch, precision)
        self.num_prefix_tokens = num_prefix_tokens if separate_prefix else 0
        groups = 2 if self.num_prefix_tokens else 1
        self.sums = torch.zeros(groups, dim, dim, dtype=torch.float64, device=device)
        # Token counts are known from shapes on the host: counting never syncs the device.
        self.counts = [0] * groups

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Adds the tokens of ``x`` (``(B, N, d)`` with prefix tokens first, or ``(M, d)``)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected width {self.dim}, got input of shape {tuple(x.shape)}")
        if x.dim() == 3 and self.num_prefix_tokens:
            parts = [x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]]
        else:
            parts = [x]
        for g, part in enumerate(parts):
            flat = part.reshape(-1, self.dim).to(self.dtype)
            if flat.shape[0] == 0:
                continue
            self.sums[g] += (flat.T @ flat).double()
            self.counts[g] += flat.shape[0]

    def matrix(self) -> torch.Tensor:
        """Sum over groups of each group's second moment divided by its trace (float64)."""
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.sums.device)
        for g, count in enumerate(self.counts):
            if count:
                s = self.sums[g]
                total += s / s.diagonal().sum().clamp_min(torch.finfo(torch.float64).tiny)
        return total

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far, over all groups."""
        return sum(self.counts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, for safetensors / ``torch.load(weights_only=True)``."""
        return {"sums": self.sums, "counts": torch.tensor(self.counts, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`; shapes must match."""
        if state["sums"].shape != self.sums.shape:
            raise ValueError(
                f"covariance shape {tuple(state['sums'].shape)} != {tuple(self.sums.shape)}"
            )
        self.sums.copy_(state["sums"])
        self.counts = [int(c) for c in state["counts"].tolist()]


def null_space_projector(sigma: torch.Tensor, config: NullSpaceConfig) -> tuple[torch.Tensor, int]:
    """Projector onto the approximate null space of a symmetric PSD matrix.

    Args:
        sigma: ``(d, d)`` second-moment matrix (any float dtype; solved in float64).
        config: Threshold rule, its parameter and the relaxation η.

    Returns:
        ``(P, k)``: the float64 ``(d, d)`` projector ``η·U₀U₀ᵀ + (1 − η)·I`` and the
        null-space dimension k (columns of U₀).
    """
    s = sigma.double()
    s = (s + s.T) / 2
    evals, evecs = torch.linalg.eigh(s)  # ascending
    evals = evals.clamp_min(0)
    lam_max = evals[-1]
    if config.rule == "energy":
        # Protect the fewest leading eigenvectors whose energy reaches the threshold.
        desc = evals.flip(0)
        cum = desc.cumsum(0) / desc.sum().clamp_min(torch.finfo(torch.float64).tiny)
        protected = (
            int(
                torch.searchsorted(
                    cum, torch.tensor(config.threshold, dtype=cum.dtype, device=cum.device)
                ).item()
            )
            + 1
        )
        null_mask = torch.zeros_like(evals, dtype=torch.bool)
        null_mask[: max(0, evals.numel() - protected)] = True
    elif config.rule == "ratio":
        lam_min = torch.maximum(evals[0], lam_max * _EIG_FLOOR)
        null_mask = evals <= config.threshold * lam_min
    else:  # relative
        null_mask = evals <= config.threshold * lam_max
    u0 = evecs[:, null_mask]
    proj = u0 @ u0.T
    if config.eta < 1:
        eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        proj = config.eta * proj + (1 - config.eta) * eye
    return proj, int(u0.shape[1])


class NullSpaceGuard:
    """Keeps the trainable ``down`` weights of expert banks in the old inputs' null space.

    Independent of any training framework: call :meth:`collect` after an experience,
    :meth:`project_weights` once a new expert exists and after every optimizer step, and
    (optionally) :meth:`project_grads` after every backward pass.

    Args:
        banks: The expert banks to protect.
        config: Threshold rule and relaxation.
    """

    def __init__(self, banks: Iterable[ExpertBank], config: NullSpaceConfig) -> None:
        self.banks = list(banks)
        self.config = config
        self.accumulators: list[CovarianceAccumulator] | None = None
        self.projectors: list[torch.Tensor] | None = None
        self.null_dims: list[int] = []

    def _ensure_accumulators(self) -> list[CovarianceAccumulator]:
        if self.accumulators is None:
            self.accumulators = [
                CovarianceAccumulator(
                    b.in_features,
                    num_prefix_tokens=b.num_prefix_tokens,
                    separate_prefix=self.config.separate_prefix,
                    device=_bank_device(b),
                    precision=self.config.precision,
                )
                for b in self.banks
            ]
        return self.accumulators

    @contextmanager
    def recording(self):
        """Within the block, every forward pass adds the banks' inputs to the statistics."""
        accs = self._ensure_accumulators()
        handles = [
            bank.register_forward_pre_hook(_make_hook(acc)) for bank, acc in zip(self.banks, accs)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def collect(
        self, forward: Callable[[torch.Tensor], object], batches: Iterable[torch.Tensor]
    ) -> None:
        """Runs ``forward`` over ``batches`` while recording, then refreshes the projectors."""
        with self.collecting():
            for x in batches:
                forward(x)

    @contextmanager
    def collecting(self):
        """Like :meth:`recording`, then combines ranks and refreshes the projectors.

        Lets a forward pass that runs anyway (e.g. the one feeding a statistics head)
        also feed the covariance, instead of a second pass over the data. Under
        torch.distributed each rank records its shard; the increments are summed over
        ranks before the projectors are computed, so every rank gets the same ones.
        """
        accs = self._ensure_accumulators()
        before = [(a.sums.clone(), torch.tensor(a.counts, dtype=torch.float64)) for a in accs]
        with self.recording():
            yield
        self._combine_ranks(accs, before)
        self.refresh()

    @torch.no_grad()
    def _combine_ranks(self, accs: list, before: list) -> None:
        for acc, (sums, counts) in zip(accs, before):
            distributed.all_reduce_increment_(acc.sums, sums)
            now = torch.tensor(acc.counts, dtype=torch.float64)
            distributed.all_reduce_increment_(now, counts)
            acc.counts = [int(c) for c in now.tolist()]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recomputes every projector from the accumulated statistics."""
        accs = self._ensure_accumulators()
        self.projectors, self.null_dims = [], []
        for acc in accs:
            proj, k = null_space_projector(acc.matrix(), self.config)
            self.projectors.append(proj.float())
            self.null_dims.append(k)

    @torch.no_grad()
    def project_weights(self) -> None:
        """``W ← W·P`` for every trainable ``down`` weight (rows into the null space)."""
        if self.projectors is None:
            return
        for bank, proj in zip(self.banks, self.projectors):
            for w in bank.trainable_down_weights():
                w.copy_(w @ proj.to(w.dtype))

    @torch.no_grad()
    def project_grads(self) -> None:
        """``g ← g·P``: exact for SGD; Adam-type steps still need :meth:`project_weights`."""
        if self.projectors is None:
            return
        for bank, proj in zip(self.banks, self.projectors):
            for w in bank.trainable_down_weights():
                if w.grad is not None:
                    w.grad.copy_(w.grad @ proj.to(w.grad.dtype))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One constrained update for a hand-written loop: project grads, step, project weights.

        (The Avalanche plugin calls the two projections from its own hooks.)
        """
        self.project_grads()
        optimizer.step()
        self.project_weights()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Covariance statistics of every bank, as plain tensors."""
        out = {}
        for i, acc in enumerate(self._ensure_accumulators()):
            for k, v in acc.state_dict().items():
                out[f"bank{i}.{k}"] = v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict` and recomputes the projectors."""
        for i, acc in enumerate(self._ensure_accumulators()):
            acc.load_state_dict({k: state[f"bank{i}.{k}"] for k in ("sums", "counts")})
        if any(acc.num_tokens for acc in self.accumulators or []):
            self.refresh()


def _bank_device(bank: ExpertBank) -> torch.device:
    for p in bank.parameters():
        return p.device
    return torch.device("cpu")


def _make_hook(acc: CovarianceAccumulator):
    def hook(_module: nn.Module, args: tuple) -> None:
        acc.update(args[0].detach())

    return hook
