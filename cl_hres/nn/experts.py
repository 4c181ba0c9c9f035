"""Banks of low-rank experts and the wrappers that put them beside timm modules.

An :class:`ExpertBank` holds experts ``up_k · act(down_k · x)`` keyed by name in two
``nn.ModuleDict`` s (as peft keeps ``lora_A``/``lora_B``). Only the newest expert can be
trainable; all experts are evaluated as one fused computation: the ``down`` weights are
concatenated into one ``(K·r) × d`` matrix and the ``up`` weights into one ``d × (K·r)``
matrix, so K experts cost two matmuls, not a Python loop.

Wrappers keep the wrapped layer as ``base_layer`` and compute ``base(x) + bank(x)``:
:class:`ParallelBlock` around a timm ``Block`` (H-Res: the bank reads the block input) and
:class:`LoRALinear` around an ``nn.Linear`` (LoRA: activation is the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_hres.nn.base import Adapter, placement

__all__ = ["ExpertBank", "LoRALinear", "ParallelBlock"]


class ExpertBank(Adapter, nn.Module):
    """Experts ``scale · Σ_k up_k(act(down_k(x)))`` with bias-free projections.

    Args:
        in_features: Width of the input ``x``.
        out_features: Width of the output.
        rank: Bottleneck width of each expert.
        scale: Factor λ applied to the experts' sum.
        activation: ``"gelu"`` (H-Res) or ``"identity"`` (LoRA).
        num_prefix_tokens: Leading cls/register tokens in the token axis of ``x``; the
            null-space projection treats them as a separate token group.
        device: Device of the wrapped layer; new experts are created there.
        dtype: Floating dtype of the wrapped layer; new experts get it too.

    Attributes:
        null_space: The bank's null-space projection state (a module holding the old
            inputs' covariance and the projector, see :mod:`cl_hres.nsp.guard`), or None
            when the bank is not protected. Set by ``NullSpaceGuard``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scale: float,
        activation: str = "gelu",
        num_prefix_tokens: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "identity"):
            raise ValueError(f"activation must be gelu or identity, got {activation!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scale = scale
        self.activation = activation
        self.num_prefix_tokens = num_prefix_tokens
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.null_space: nn.Module | None = None
        # Switched off by ContinualViT.experts_disabled() to read the pretrained features
        # (APER's concatenation); a plain attribute (Adapter): never part of the state.
        self.enabled = True
        # The name of the one expert to run, or None for all (cl_hres.nn.views reads one
        # expert's feature space at a time); a plain attribute too.
        self.only: str | None = None
        # An empty bank has no parameter to read its device or dtype from: this zero-size
        # buffer follows every .to() / .bfloat16() of the model, so placement() (and with
        # it add_expert and the null-space state) finds the wrapped layer's.
        self.register_buffer(
            "_anchor",
            torch.empty(0, device=device, dtype=dtype or torch.get_default_dtype()),
            persistent=False,
        )

    @property
    def device(self) -> torch.device:
        """Device of the wrapped layer (and of the experts)."""
        return placement(self)[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the wrapped layer (and of the experts)."""
        return placement(self)[1]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every expert's ``down`` and ``up`` weights, frozen ones included."""
        return list(self.parameters())

    @property
    def num_experts(self) -> int:
        """How many experts the bank holds."""
        return len(self.down)

    @property
    def accepts_experts(self) -> bool:
        """False where null-space projection leaves a new expert nothing to learn from.

        That is, for good once the bank's null space is empty, and for one experience when
        the experience's inputs have (almost) no energy in it (``NullSpaceGuard.admitting``).
        """
        return getattr(self.null_space, "accepts_experts", True)

    def add_expert(
        self, device: torch.device | str | None = None, *, force: bool = False
    ) -> str | None:
        """Freezes every existing expert and appends a new trainable one.

        ``down`` gets nn.Linear's default (Kaiming-uniform) init and ``up`` is zero, so a
        fresh expert adds exactly zero to the output. The expert gets the wrapped layer's
        device and dtype. A bank that does not :attr:`accepts_experts` gets no expert: its
        ``down`` weights could read (almost) nothing of the inputs, and the dead expert
        would still cost two matmuls at inference.

        Args:
            device: Overrides the wrapped layer's device.
            force: Add the expert even where the bank takes none (to rebuild a
                checkpoint's layout).

        Returns:
            The new expert's name, or None when the bank took no expert.
        """
        for module in (*self.down.values(), *self.up.values()):
            module.requires_grad_(False)
        if not (force or self.accepts_experts):
            return None
        name = f"expert{self.num_experts}"
        kw = {"device": device or self.device, "dtype": self.dtype}
        down = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        up = nn.Linear(self.rank, self.out_features, bias=False, **kw)
        nn.init.zeros_(up.weight)
        self.down[name] = down
        self.up[name] = up
        return name

    def trainable_down_weights(self) -> list[nn.Parameter]:
        """The ``down`` weights that an optimizer may change (rows live in input space)."""
        return [m.weight for m in self.down.values() if m.weight.requires_grad]

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' weights as one ``(K·r, in)`` and one ``(out, K·r)`` matrix."""
        downs = [m.weight for m in self.down.values()]
        ups = [m.weight for m in self.up.values()]
        if len(downs) == 1:
            return downs[0], ups[0]
        return torch.cat(downs, dim=0), torch.cat(ups, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Returns the experts' contribution, or ``None`` while empty or disabled."""
        if not (self.down and self.enabled):
            return None
        if self.only is not None:
            if self.only not in self.down:
                return None
            w_down, w_up = self.down[self.only].weight, self.up[self.only].weight
        else:
            w_down, w_up = self.fused_weights()
        h = F.linear(x, w_down)
        if self.activation == "gelu":
            h = F.gelu(h)
        return F.linear(h, w_up) * self.scale

    def extra_repr(self) -> str:
        """The bank's sizes and expert count, for ``print(model)``."""
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scale={self.scale}, act={self.activation}, experts={self.num_experts}"
            + ("" if self.accepts_experts else ", takes no expert")
        )


def _add_delta(base_out: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    # Adding +0.0 is exact in IEEE arithmetic, so a zero-initialised expert leaves the
    # output bit-identical; skipping the add when the bank is empty saves the work.
    return base_out if delta is None else base_out + delta.to(base_out.dtype)


class ParallelBlock(nn.Module):
    """``base_layer(z) + bank(z)``: an expert bank in parallel to a transformer block.

    The bank reads the block's input (the residual stream), or with ``read_norm`` that
    input through the block's own frozen ``norm1`` (what its attention reads; called, not
    registered again, so the state dict holds it once). It never adds tokens, so the
    block's attention is that of the frozen block for the same input.
    """

    def __init__(self, base_layer: nn.Module, bank: ExpertBank, read_norm: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank
        self.read_norm = read_norm

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped block's output plus the experts' contribution."""
        read = self.base_layer.norm1(x) if self.read_norm else x
        return _add_delta(self.base_layer(x, *args, **kwargs), self.bank(read))


class LoRALinear(nn.Module):
    """``base_layer(x) + scale · B·A·x`` with one (A, B) pair per expert in ``bank``."""

    def __init__(self, base_layer: nn.Linear, bank: ExpertBank) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (read by timm's fused attention)."""
        # timm's fused attention reads ``qkv.weight`` in a few code paths; expose it.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped linear layer's output plus the low-rank experts'."""
        return _add_delta(self.base_layer(x), self.bank(x))
