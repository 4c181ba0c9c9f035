"""Dataclass configurations of the adapters and of the null-space projection.

Each config validates itself in ``__post_init__`` (as peft's configs do), so a bad value
fails when the config is built, before any model or data is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cl_hres.errors import ConfigError

__all__ = [
    "HEAD_CHOICES",
    "NSP_RULES",
    "HResConfig",
    "LoRAConfig",
    "NullSpaceConfig",
    "VPTConfig",
]

NSP_RULES = ("energy", "ratio", "relative")
HEAD_CHOICES = ("linear", "ncm", "ridge")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_finite_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _check_blocks(blocks: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if blocks is None:
        return None
    blocks = tuple(blocks)
    if not blocks:
        raise ConfigError("blocks must name at least one block (or be None for all)")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigError(f"blocks must be integers, got {b!r}")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"blocks must not repeat, got {list(blocks)}")
    return blocks


@dataclass
class HResConfig:
    """H-Res expert bottleneck adapters in parallel to ViT blocks."""

    rank: int = field(default=32, metadata={"help": "Bottleneck width r of every expert."})
    scale: float = field(default=1.0, metadata={"help": "λ multiplying the experts' sum."})
    blocks: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "Indices of the blocks to adapt; None: all. Negative ones count from "
            "the end (on the command line: --blocks=-1,-2)."
        },
    )
    input: str = field(
        default="block",
        metadata={
            "help": "What the experts read: block (the residual stream, the paper's) or "
            "norm (it through the block's frozen first LayerNorm)."
        },
    )

    def __post_init__(self) -> None:
        if self.input not in ("block", "norm"):
            raise ConfigError(f"hres input must be block or norm, got {self.input!r}")
        _check_positive_int("hres rank", self.rank)
        _check_finite_positive("hres scale", self.scale)
        self.blocks = _check_blocks(self.blocks)


@dataclass
class LoRAConfig:
    """Low-rank adapters on the linear maps of attention and/or MLP sub-modules."""

    rank: int = field(default=8, metadata={"help": "Rank of A (r×in) and B (out×r)."})
    alpha: float = field(default=16.0, metadata={"help": "Scale is alpha / rank."})
    targets: tuple[str, ...] = field(
        default=("attn",),
        metadata={"help": "Sub-module types whose nn.Linear layers get LoRA: attn, mlp."},
    )
    blocks: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Indices of the blocks to adapt; None: all."}
    )

    def __post_init__(self) -> None:
        _check_positive_int("lora rank", self.rank)
        _check_finite_positive("lora alpha", self.alpha)
        self.targets = tuple(self.targets)
        bad = sorted(set(self.targets) - {"attn", "mlp"})
        if bad or not self.targets:
            raise ConfigError(f"lora targets must be a non-empty subset of attn,mlp, got {bad}")
        self.blocks = _check_blocks(self.blocks)

    @property
    def scale(self) -> float:
        """The factor alpha / rank applied to B·A."""
        return self.alpha / self.rank


@dataclass
class VPTConfig:
    """Visual prompt tuning: learnable tokens inserted after the prefix tokens."""

    length: int = field(default=10, metadata={"help": "Number of prompt tokens p."})
    deep: bool = field(default=True, metadata={"help": "New prompts at every block (deep)."})

    def __post_init__(self) -> None:
        _check_positive_int("vpt length", self.length)
        if not isinstance(self.deep, bool):
            raise ConfigError(f"vpt deep must be true or false, got {self.deep!r}")


@dataclass
class NullSpaceConfig:
    """How the null space of the old tasks' input covariance is chosen.

    Rules (eigenvalues λ of the normalised covariance, λ_max the largest):
      * ``energy`` (GPM / InfLoRA): protect the leading eigenvectors holding ``threshold``
        of the total energy; the rest is the null space. ``threshold`` in (0, 1).
      * ``ratio`` (Adam-NSCL): null space is λ ≤ ``threshold`` · λ_min, with λ_min floored
        at 1e-12·λ_max so that exactly singular covariances behave. ``threshold`` ≥ 1.
      * ``relative``: null space is λ ≤ ``threshold`` · λ_max. ``threshold`` in (0, 1).
    ``eta`` < 1 relaxes the projector to ``eta·P + (1 − eta)·I`` (VPT-NSP²); it trades
    exactness for plasticity. ``min_free_energy``: a bank takes an expert for a new
    experience only where at least this share of the experience's input energy (measured
    on its data before training, token groups weighed as for the projector) lies in the
    directions the projector leaves free; below it the expert could learn (almost)
    nothing and would only cost inference compute. 0 adds one wherever a free direction
    exists. ``min_selectivity`` (0: off): a bank also takes no expert where that share is
    less than ``min_selectivity`` times the share of the *old* inputs' energy the same
    directions hold. Along a direction where new inputs have μ times the old ones' energy,
    an expert moves old features by about ``1/√μ`` of what it moves new ones, so with a
    loose threshold this admits only the banks whose free directions tell the new
    experience from the old ones (per block and per experience). With ``eta`` < 1 the old
    share is at least ``1 − eta``, so ``min_selectivity`` > ``1/(1 − eta)`` makes every
    constrained bank dormant.
    """

    rule: str = field(default="relative", metadata={"help": "energy | ratio | relative"})
    threshold: float = field(default=1e-6, metadata={"help": "Parameter of the rule."})
    eta: float = field(default=1.0, metadata={"help": "Relaxation in (0, 1]; 1 is exact."})
    min_free_energy: float = field(
        default=1e-6,
        metadata={
            "help": "Share of a new experience's input energy a bank's free directions must "
            "hold for it to take an expert (0: always)."
        },
    )
    min_selectivity: float = field(
        default=0.0,
        metadata={
            "help": "Ratio of the new to the old inputs' energy shares in a bank's free "
            "directions below which it takes no expert (0: off)."
        },
    )
    separate_prefix: bool = field(
        default=True,
        metadata={"help": "Normalise prefix (cls/register) and patch tokens separately."},
    )
    precision: str = field(
        default="float64",
        metadata={"help": "Precision of each batch's XᵀX: float64 (exact) or float32."},
    )

    def __post_init__(self) -> None:
        if self.rule not in NSP_RULES:
            raise ConfigError(f"nsp rule must be one of {', '.join(NSP_RULES)}, got {self.rule!r}")
        _check_finite_positive("nsp threshold", self.threshold)
        if self.rule in ("energy", "relative") and not self.threshold < 1:
            raise ConfigError(f"nsp threshold for rule {self.rule} must be in (0, 1)")
        if self.rule == "ratio" and self.threshold < 1:
            raise ConfigError("nsp threshold for rule ratio must be >= 1")
        _check_finite_positive("nsp eta", self.eta)
        if self.eta > 1:
            raise ConfigError(f"nsp eta must be in (0, 1], got {self.eta!r}")
        m = self.min_free_energy
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ConfigError(f"nsp min_free_energy must be in [0, 1), got {m!r}")
        q = self.min_selectivity
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q < float("inf"):
            raise ConfigError(f"nsp min_selectivity must be a number >= 0, got {q!r}")
        if self.precision not in ("float64", "float32"):
            raise ConfigError(f"nsp precision must be float64 or float32, got {self.precision!r}")
