"""Dataclass configurations of the methods added to a frozen ViT (H-Res, LoRA, VPT).

Each config validates itself in ``__post_init__`` (as peft's configs do), so a bad value
fails when the config is built, before any model or data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cl_hres import registry
from cl_hres.checks import check_finite_nonneg, check_finite_positive, check_positive_int
from cl_hres.errors import ConfigError

__all__ = [
    "check_model_arguments",
    "HEAD_CHOICES",
    "CodaPromptConfig",
    "DualPromptConfig",
    "HResConfig",
    "L2PConfig",
    "LoRAConfig",
    "VPTConfig",
]

HEAD_CHOICES = ("linear", "ncm", "ridge")


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
        check_positive_int("hres rank", self.rank)
        check_finite_positive("hres scale", self.scale)
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
        check_positive_int("lora rank", self.rank)
        check_finite_positive("lora alpha", self.alpha)
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
        check_positive_int("vpt length", self.length)
        if not isinstance(self.deep, bool):
            raise ConfigError(f"vpt deep must be true or false, got {self.deep!r}")


@dataclass
class L2PConfig:
    """Learning to Prompt (Wang et al., CVPR 2022): a pool of prompts chosen by key.

    Defaults are the paper's Split CIFAR-100 settings: M = 10 prompts of length
    L_p = 5, the N = 5 best-matching ones prepended, key-matching weight λ = 0.1.
    """

    pool_size: int = field(default=10, metadata={"help": "Prompts in the pool (M)."})
    length: int = field(default=5, metadata={"help": "Tokens per prompt (L_p)."})
    top_k: int = field(default=5, metadata={"help": "Prompts chosen per image (N)."})
    key_loss_weight: float = field(
        default=0.1, metadata={"help": "Weight of the key-query matching loss (lambda)."}
    )

    def __post_init__(self) -> None:
        for name in ("pool_size", "length", "top_k"):
            check_positive_int(f"l2p {name}", getattr(self, name))
        if self.top_k > self.pool_size:
            raise ConfigError(
                f"l2p top_k ({self.top_k}) cannot exceed pool_size ({self.pool_size})"
            )
        check_finite_nonneg("l2p key_loss_weight", self.key_loss_weight)


@dataclass
class DualPromptConfig:
    """DualPrompt (Wang et al., ECCV 2022): a shared G-prompt and one E-prompt per task.

    Prefix-tuning (the paper's best variant): a prompt of length L gives L key and L value
    tokens to a block's attention. Defaults are the paper's: G-prompt length 5 in blocks
    0-1, E-prompts of length 20 in blocks 2-4, one E-prompt per experience (pool of 10),
    key-matching weight 1. Blocks beyond the ViT's depth are left out.
    """

    g_length: int = field(default=5, metadata={"help": "G-prompt length (L_g)."})
    g_blocks: tuple[int, ...] = field(
        default=(0, 1), metadata={"help": "Blocks with the G-prompt."}
    )
    e_length: int = field(default=20, metadata={"help": "E-prompt length (L_e)."})
    e_blocks: tuple[int, ...] = field(
        default=(2, 3, 4), metadata={"help": "Blocks with the E-prompts."}
    )
    pool_size: int = field(
        default=10, metadata={"help": "E-prompts (at least the stream's experiences)."}
    )
    key_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the key-query matching loss (lambda)."}
    )

    def __post_init__(self) -> None:
        for name in ("g_length", "e_length", "pool_size"):
            check_positive_int(f"dualprompt {name}", getattr(self, name))
        check_finite_nonneg("dualprompt key_loss_weight", self.key_loss_weight)
        self.g_blocks = _check_blocks(self.g_blocks)
        self.max_experiences = self.pool_size  # one E-prompt each
        self.e_blocks = _check_blocks(self.e_blocks)
        if set(self.g_blocks) & set(self.e_blocks):
            raise ConfigError("dualprompt g_blocks and e_blocks must not share a block")


@dataclass
class CodaPromptConfig:
    """CODA-Prompt (Smith et al., CVPR 2023): prompts as attention-weighted components.

    Defaults are the paper's: 100 components of length 8 in blocks 0-4 (prefix-tuning,
    half keys, half values), split evenly over ``tasks`` experiences, each experience's
    new components initialised orthogonal to the earlier ones (Gram-Schmidt);
    ``ortho_weight`` > 0 adds the paper's orthogonality penalty.
    """

    pool_size: int = field(default=100, metadata={"help": "Prompt components in all (M)."})
    length: int = field(default=8, metadata={"help": "Prefix length per component (even)."})
    blocks: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"help": "Prompted blocks."})
    tasks: int = field(default=10, metadata={"help": "Experiences the components are split over."})
    ortho_weight: float = field(
        default=0.0, metadata={"help": "Weight of the orthogonality penalty."}
    )

    def __post_init__(self) -> None:
        for name in ("pool_size", "length", "tasks"):
            check_positive_int(f"coda_prompt {name}", getattr(self, name))
        if self.length % 2:
            raise ConfigError(f"coda_prompt length must be even (keys + values), got {self.length}")
        if self.pool_size < self.tasks:
            raise ConfigError(
                f"coda_prompt pool_size ({self.pool_size}) must be at least tasks ({self.tasks})"
            )
        check_finite_nonneg("coda_prompt ortho_weight", self.ortho_weight)
        self.blocks = _check_blocks(self.blocks)
        self.max_experiences = self.tasks  # the components are split over them


def check_model_arguments(
    method: str, head: str, concat_pretrained: bool, adapt_experiences: int | None
) -> Any:
    """The method's registry entry; ConfigError for arguments that do not fit it."""
    if method not in registry.METHODS:
        raise ConfigError(
            f"unknown method {method!r}; choose from {', '.join(sorted(registry.METHODS))}"
        )
    spec = registry.METHODS[method]
    if head not in HEAD_CHOICES:
        raise ConfigError(f"unknown head {head!r}; choose from {', '.join(HEAD_CHOICES)}")
    if concat_pretrained and not spec.switchable:
        raise ConfigError(
            f"concat_pretrained needs a method that can be switched off, not {method}"
        )
    if adapt_experiences is not None and adapt_experiences < 1:
        raise ConfigError(f"adapt_experiences must be >= 1, got {adapt_experiences}")
    return spec
