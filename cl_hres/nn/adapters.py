"""Put expert banks or prompts into a timm VisionTransformer, by wrapping its modules.

Nothing of timm is copied: blocks in ``vit.blocks`` are replaced by wrappers that call the
original block, and LoRA targets are chosen by module type (timm ``Attention`` / ``Mlp``),
not by matching parameter names.
"""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from cl_hres.errors import ConfigError
from cl_hres.nn.base import placement
from cl_hres.nn.config import HResConfig, LoRAConfig
from cl_hres.nn.experts import ExpertBank, LoRALinear, ParallelBlock

__all__ = ["add_hres_experts", "add_lora_experts", "block_indices", "check_vit", "expert_banks"]


def check_vit(vit: nn.Module) -> VisionTransformer:
    """Returns ``vit`` if it is a timm VisionTransformer with its blocks in a Sequential."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    if not isinstance(vit.blocks, nn.Sequential) or len(vit.blocks) == 0:
        raise ConfigError("the VisionTransformer has no blocks to adapt")
    return vit


def block_indices(vit: VisionTransformer, blocks: tuple[int, ...] | None) -> list[int]:
    """The chosen blocks' indices, sorted (negative ones count from the end; None: all)."""
    depth = len(vit.blocks)
    if blocks is None:
        return list(range(depth))
    out = []
    for b in blocks:
        if not -depth <= b < depth:
            raise ConfigError(f"block index {b} is out of range for a ViT of depth {depth}")
        out.append(b % depth)
    if len(set(out)) != len(out):
        raise ConfigError(f"blocks {list(blocks)} name the same block twice")
    return sorted(out)


def expert_banks(model: nn.Module) -> list[ExpertBank]:
    """Every :class:`ExpertBank` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ExpertBank)]


def add_hres_experts(vit: nn.Module, config: HResConfig) -> list[ExpertBank]:
    """Wraps the chosen blocks in :class:`ParallelBlock` with an empty GELU bank each."""
    vit = check_vit(vit)
    banks = []
    for i in block_indices(vit, config.blocks):
        device, dtype = placement(vit.blocks[i])
        bank = ExpertBank(
            vit.embed_dim,
            vit.embed_dim,
            rank=config.rank,
            scale=config.scale,
            activation="gelu",
            num_prefix_tokens=vit.num_prefix_tokens,
            device=device,
            dtype=dtype,
        )
        read_norm = config.input == "norm"
        if read_norm and not isinstance(getattr(vit.blocks[i], "norm1", None), nn.Module):
            raise ConfigError(f"hres input norm needs blocks with a norm1; block {i} has none")
        vit.blocks[i] = ParallelBlock(vit.blocks[i], bank, read_norm=read_norm)
        banks.append(bank)
    return banks


def add_lora_experts(vit: nn.Module, config: LoRAConfig) -> list[ExpertBank]:
    """Wraps every ``nn.Linear`` of the chosen blocks' Attention/Mlp in :class:`LoRALinear`."""
    vit = check_vit(vit)
    target_types: tuple[type, ...] = tuple(
        {"attn": Attention, "mlp": Mlp}[t] for t in config.targets
    )
    banks = []
    for i in block_indices(vit, config.blocks):
        for parent in list(vit.blocks[i].modules()):
            if not isinstance(parent, target_types):
                continue
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                device, dtype = placement(child)
                bank = ExpertBank(
                    child.in_features,
                    child.out_features,
                    rank=config.rank,
                    scale=config.scale,
                    activation="identity",
                    num_prefix_tokens=vit.num_prefix_tokens,
                    device=device,
                    dtype=dtype,
                )
                setattr(parent, name, LoRALinear(child, bank))
                banks.append(bank)
    if not banks:
        raise ConfigError(f"no linear layer found in {config.targets} of the chosen blocks")
    return banks
