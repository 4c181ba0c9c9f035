"""Put expert banks or prompts into a timm VisionTransformer, by wrapping its modules.

Nothing of timm is copied: blocks in ``vit.blocks`` are replaced by wrappers that call the
original block, and LoRA targets are chosen by module type (timm ``Attention`` / ``Mlp``),
not by matching parameter names.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from cl_hres.config import HResConfig, LoRAConfig, VPTConfig
from cl_hres.errors import ConfigError
from cl_hres.experts import ExpertBank, LoRALinear, ParallelBlock

__all__ = [
    "PromptedBlock",
    "add_hres_experts",
    "add_lora_experts",
    "add_vpt_prompts",
    "attach_vpt_prompts",
    "check_vit",
    "expert_banks",
]


def check_vit(vit: nn.Module) -> VisionTransformer:
    """Returns ``vit`` if it is a timm VisionTransformer with its blocks in a Sequential."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    if not isinstance(vit.blocks, nn.Sequential) or len(vit.blocks) == 0:
        raise ConfigError("the VisionTransformer has no blocks to adapt")
    return vit


def _block_indices(vit: VisionTransformer, blocks: tuple[int, ...] | None) -> list[int]:
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


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    """A floating parameter of ``module``: experts beside it take its device and dtype."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return torch.empty(0)


def add_hres_experts(vit: nn.Module, config: HResConfig) -> list[ExpertBank]:
    """Wraps the chosen blocks in :class:`ParallelBlock` with an empty GELU bank each."""
    vit = check_vit(vit)
    banks = []
    for i in _block_indices(vit, config.blocks):
        ref = _reference_tensor(vit.blocks[i])
        bank = ExpertBank(
            vit.embed_dim,
            vit.embed_dim,
            rank=config.rank,
            scale=config.scale,
            activation="gelu",
            num_prefix_tokens=vit.num_prefix_tokens,
            device=ref.device,
            dtype=ref.dtype,
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
    for i in _block_indices(vit, config.blocks):
        for parent in list(vit.blocks[i].modules()):
            if not isinstance(parent, target_types):
                continue
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                bank = ExpertBank(
                    child.in_features,
                    child.out_features,
                    rank=config.rank,
                    scale=config.scale,
                    activation="identity",
                    num_prefix_tokens=vit.num_prefix_tokens,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                setattr(parent, name, LoRALinear(child, bank))
                banks.append(bank)
    if not banks:
        raise ConfigError(f"no linear layer found in {config.targets} of the chosen blocks")
    return banks


class PromptedBlock(nn.Module):
    """A block that inserts, replaces or strips VPT prompt tokens around ``base_layer``.

    Prompt tokens sit right after the prefix (cls/register) tokens. The first prompted
    block inserts them; in deep VPT each later block overwrites them with its own prompts;
    the last block strips them so timm's pooling and head see the usual token layout.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        prompts: nn.Parameter | None,
        num_prefix_tokens: int,
        length: int,
        insert: bool,
        strip: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompts = prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.length = length
        self.insert = insert
        self.strip = strip
        # Off: the block is the pretrained one (ContinualViT.experts_disabled); every
        # PromptedBlock is switched together, so no block meets a half-prompted sequence.
        self.enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        npfx = self.num_prefix_tokens
        if self.prompts is not None:
            prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            rest = x[:, npfx:] if self.insert else x[:, npfx + self.length :]
            x = torch.cat([x[:, :npfx], prompts, rest], dim=1)
        x = self.base_layer(x, *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, :npfx], x[:, npfx + self.length :]], dim=1)
        return x


def attach_vpt_prompts(vit: nn.Module, config: VPTConfig) -> list[ExpertBank]:
    """:func:`add_vpt_prompts` under the registry's attach signature (VPT has no banks)."""
    add_vpt_prompts(vit, config)
    return []


def add_vpt_prompts(vit: nn.Module, config: VPTConfig) -> list[nn.Parameter]:
    """Wraps every block in :class:`PromptedBlock`; returns the prompt parameters."""
    vit = check_vit(vit)
    patch = vit.patch_embed.patch_size
    patch_area = patch[0] * patch[1] if isinstance(patch, tuple) else patch * patch
    # Uniform init with the bound of the VPT paper (Jia et al., 2022).
    bound = math.sqrt(6.0 / float(3 * patch_area + vit.embed_dim))
    depth = len(vit.blocks)
    params = []
    ref = vit.patch_embed.proj.weight
    for i in range(depth):
        prompts = None
        if i == 0 or config.deep:
            prompts = nn.Parameter(
                torch.empty(1, config.length, vit.embed_dim, device=ref.device, dtype=ref.dtype)
            )
            nn.init.uniform_(prompts, -bound, bound)
            params.append(prompts)
        vit.blocks[i] = PromptedBlock(
            vit.blocks[i],
            prompts=prompts,
            num_prefix_tokens=vit.num_prefix_tokens,
            length=config.length,
            insert=i == 0,
            strip=i == depth - 1,
        )
    return params
