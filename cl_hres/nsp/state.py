"""The null-space state an expert bank carries: covariance of old inputs and projector.

Buffers only (:class:`NullSpaceState` is registered as ``bank.null_space``), so the
statistics move with ``model.to()``, are saved in ``state_dict`` and seen by DDP. The
rules that turn the covariance into a projector, and their enforcement during training,
are in :mod:`cl_hres.nsp.guard`.
"""

from __future__ import annotations

import torch
from torch import nn

from cl_hres.nn.experts import ExpertBank

__all__ = ["CovarianceAccumulator", "NullSpaceState", "attach_null_space"]


class _KeepsDtypes(nn.Module):
    """A buffer-only module whose buffers keep their dtype under ``.to(dtype)`` / ``.half()``.

    Casting the whole model to bfloat16 must not round float64 statistics: only the device
    that ``fn`` sends a buffer to is taken.
    """

    def _apply(self, fn, recurse: bool = True):
        if recurse:
            for module in self.children():
                module._apply(fn, recurse)
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


class CovarianceAccumulator(_KeepsDtypes):
    """Streaming ``Σ x xᵀ`` per token group, in float64 buffers on the model's device.

    The running sum is float64, so rounding does not grow with the number of tokens. Each
    batch's product ``XᵀX`` is computed in ``precision``: float64 by default, because a
    float32 product has a noise floor near 1e-8·λ_max that hides genuine small directions
    of the old inputs (attention outputs have eigenvalues down to ~1e-9·λ_max); float32 is
    faster on GPUs without fast float64 and is fine with a looser threshold.

    Prefix and patch tokens are always summed separately (two groups when there are
    prefix tokens); ``separate_prefix`` only decides whether :meth:`matrix` normalises them
    separately or pools them, so the buffers' shapes do not depend on the configuration.

    Args:
        dim: Feature width d.
        num_prefix_tokens: Leading tokens that form the prefix group.
        separate_prefix: If False, :meth:`matrix` pools all tokens into one group.
        device: Where the statistics live (the model's device).
        precision: ``"float64"`` or ``"float32"`` for each batch's product.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_prefix_tokens: int = 0,
        separate_prefix: bool = True,
        device: torch.device | str | None = None,
        precision: str = "float64",
    ) -> None:
        super().__init__()
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be float64 or float32, got {precision!r}")
        self.dim = dim
        self.precision = precision
        self.num_prefix_tokens = num_prefix_tokens
        self.separate_prefix = separate_prefix
        groups = 2 if num_prefix_tokens else 1
        self.register_buffer(
            "sums", torch.zeros(groups, dim, dim, dtype=torch.float64, device=device)
        )
        # Counts sit beside the sums on the same device, so both are all-reduced there;
        # adding a batch's token count (known from its shape) launches no host sync.
        self.register_buffer("counts", torch.zeros(groups, dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, x: torch.Tensor, *, precision: str | None = None) -> None:
        """Adds the tokens of ``x`` (``(B, N, d)`` with prefix tokens first, or ``(M, d)``).

        Args:
            x: The tokens.
            precision: Of this batch's product; default the accumulator's own. A
                :class:`~cl_hres.nsp.guard.NullSpaceGuard` passes its config's, so two
                guards over the same banks each record as configured.
        """
        dtype = getattr(torch, precision or self.precision)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected width {self.dim}, got input of shape {tuple(x.shape)}")
        if x.dim() == 3 and self.num_prefix_tokens:
            parts = [x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]]
        else:
            parts = [x]
        for g, part in enumerate(parts):
            flat = part.reshape(-1, self.dim).to(dtype)
            if flat.shape[0] == 0:
                continue
            self.sums[g] += (flat.T @ flat).double()
            self.counts[g] += flat.shape[0]

    def groups(
        self, sums: torch.Tensor | None = None, *, separate_prefix: bool | None = None
    ) -> torch.Tensor:
        """The per-group sums the projector weighs equally: separate, or pooled into one.

        Args:
            sums: Per-group sums shaped like :attr:`sums` (e.g. one experience's share of
                them); default: the accumulated sums.
            separate_prefix: Keep prefix and patch tokens apart; default the
                accumulator's own setting.
        """
        sums = self.sums if sums is None else sums
        separate = self.separate_prefix if separate_prefix is None else separate_prefix
        return sums if separate else sums.sum(0, keepdim=True)

    def matrix(
        self, sums: torch.Tensor | None = None, *, separate_prefix: bool | None = None
    ) -> torch.Tensor:
        """Sum over :meth:`groups` of each group's second moment divided by its trace (float64).

        Args:
            sums: As for :meth:`groups`, to normalise other sums the same way.
            separate_prefix: As for :meth:`groups`.
        """
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.sums.device)
        for s in self.groups(sums, separate_prefix=separate_prefix):
            # A group without tokens is all zero and adds exactly zero.
            total += s / s.diagonal().sum().clamp_min(torch.finfo(torch.float64).tiny)
        return total

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far, over all groups (reads the counts back to the host)."""
        return int(self.counts.sum())

    def token_counts(self) -> list[int]:
        """Tokens seen so far per group (reads the counts back to the host)."""
        return [int(c) for c in self.counts.tolist()]

    def empty_like(self) -> CovarianceAccumulator:
        """A new, empty accumulator with this one's width, groups, device and precision."""
        return CovarianceAccumulator(
            self.dim,
            num_prefix_tokens=self.num_prefix_tokens,
            separate_prefix=self.separate_prefix,
            device=self.sums.device,
            precision=self.precision,
        )

    @torch.no_grad()
    def zero_(self) -> None:
        """Forgets every token."""
        self.sums.zero_()
        self.counts.zero_()


class NullSpaceState(_KeepsDtypes):
    """One bank's null-space projection state: covariance, projector, null dimension.

    Registered as ``bank.null_space``, so its buffers belong to the model. Python mirrors
    of the null dimension and of :attr:`closed` let the per-step projection and
    ``ExpertBank.add_expert`` decide without reading the device; they are refreshed when
    the projector is set and when a state dict is loaded.

    Args:
        dim: Input width of the bank.
        num_prefix_tokens: Prefix tokens of the bank's input.
        device: Device of the bank.
    """

    def __init__(
        self, dim: int, *, num_prefix_tokens: int = 0, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.covariance = CovarianceAccumulator(
            dim, num_prefix_tokens=num_prefix_tokens, device=device
        )
        self.register_buffer("projector", torch.eye(dim, dtype=torch.float32, device=device))
        # -1: no statistics collected yet (no constraint).
        self.register_buffer("null_dim", torch.tensor(-1, dtype=torch.int64, device=device))
        # The projector is exactly zero: a new expert could never move off zero.
        self.register_buffer("is_closed", torch.tensor(False, device=device))
        self._null_dim, self._closed = -1, False
        # Set for one experience by NullSpaceGuard.admitting(): the new experience's
        # inputs have (almost) no energy in the free directions, so an expert would learn
        # nothing. A plain attribute: it is decided again for every experience.
        self.dormant = False

    def _mirror(self) -> None:
        self._null_dim = int(self.null_dim)
        self._closed = bool(self.is_closed)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mirror()  # one read per bank when a checkpoint is loaded

    @property
    def ready(self) -> bool:
        """Whether a projector has been computed (statistics were collected)."""
        return self._null_dim >= 0

    @property
    def dimension(self) -> int:
        """Null-space dimension k of the current projector (-1 before any statistics)."""
        return self._null_dim

    @property
    def closed(self) -> bool:
        """True when the projector is zero: the bank has lost all plasticity."""
        return self._closed

    @property
    def accepts_experts(self) -> bool:
        """Whether the bank takes an expert for the experience about to start."""
        return not (self._closed or self.dormant)

    @torch.no_grad()
    def set_projector(self, proj: torch.Tensor, null_dim: int, closed: bool) -> None:
        """Stores a projector computed by :func:`null_space_projector`."""
        self.projector.copy_(proj)
        self.null_dim.fill_(null_dim)
        self.is_closed.fill_(closed)
        self._null_dim, self._closed = null_dim, closed


def attach_null_space(bank: ExpertBank) -> NullSpaceState:
    """The bank's :class:`NullSpaceState`, created on the bank's device on first use."""
    if bank.null_space is None:
        bank.null_space = NullSpaceState(
            bank.in_features, num_prefix_tokens=bank.num_prefix_tokens, device=bank.device
        )
    return bank.null_space
