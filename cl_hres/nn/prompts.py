"""Visual prompt tuning (VPT): learnable tokens inserted after the prefix tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from cl_hres.nn.adapters import check_vit
from cl_hres.nn.base import Adapter, placement
from cl_hres.nn.config import VPTConfig
from cl_hres.nn.experts import ExpertBank

__all__ = ["PromptedBlock", "add_vpt_prompts", "attach_vpt_prompts"]


class PromptedBlock(Adapter, nn.Module):
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

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The block's prompts (none for the later blocks of shallow VPT)."""
        return [] if self.prompts is None else [self.prompts]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Inserts or replaces the prompts, runs the block, strips them after the last."""
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
    device, dtype = placement(vit)
    for i in range(depth):
        prompts = None
        if i == 0 or config.deep:
            prompts = nn.Parameter(
                torch.empty(1, config.length, vit.embed_dim, device=device, dtype=dtype)
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
