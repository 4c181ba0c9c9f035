"""DualPrompt (Wang et al., ECCV 2022): a shared G-prompt and a per-task E-prompt, by prefix.

Prefix-tuning: a prompt ``p ∈ R^{2×L×D}`` gives ``L`` extra keys and ``L`` extra values
to a block's attention (``[p_k; W_k x]``, ``[p_v; W_v x]``); queries and the token count do
not change. The G-prompt (blocks ``g_blocks``) is shared by every experience; experience
``t`` trains E-prompt ``t`` (blocks ``e_blocks``) and its key ``k_t``. At test time an
image takes the E-prompt whose key is most cosine-similar to its query, the frozen
pretrained backbone's pre-logits feature. Training adds ``λ · (1 − cos(q, k_t))`` (batch
mean). Widths and head counts come from the ViT; nothing is hard-coded.

The attention with prefixes is computed from the wrapped timm ``Attention``'s own layers
(``qkv``, ``q_norm``/``k_norm``, ``norm``, ``proj``): with no prefix set it runs the wrapped
module itself.
"""

from __future__ import annotations

import torch
from torch import nn

from cl_hres.errors import ConfigError
from cl_hres.nn.adapters import check_vit
from cl_hres.nn.base import Adapter, placement
from cl_hres.nn.config import DualPromptConfig
from cl_hres.nn.experts import ExpertBank
from cl_hres.nn.prompt_query import QueriedPromptViT, add_prefix_attention, prefixes_set

__all__ = ["DualPromptPool", "DualPromptViT", "attach_dual_prompt"]


class DualPromptPool(Adapter, nn.Module):
    """The G-prompt, the E-prompt pool and its keys (a submodule of the backbone)."""

    def __init__(
        self,
        config: DualPromptConfig,
        g_blocks: list[int],
        e_blocks: list[int],
        width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config, self.g_blocks, self.e_blocks = config, g_blocks, e_blocks
        kw = dict(device=device, dtype=dtype)
        # Uniform in [-1, 1) as the paper's code initialises prompts and keys.
        self.g = nn.Parameter(torch.empty(len(g_blocks), 2, config.g_length, width, **kw))
        self.e = nn.Parameter(
            torch.empty(config.pool_size, len(e_blocks), 2, config.e_length, width, **kw)
        )
        self.keys = nn.Parameter(torch.empty(config.pool_size, width, **kw))
        for p in (self.g, self.e, self.keys):
            nn.init.uniform_(p, -1, 1)
        self.enabled = True

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The G-prompt, the E-prompts and their keys."""
        return [self.g, self.e, self.keys]

    def choose(self, query: torch.Tensor, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the best-matching E-prompt among the first ``tasks`` and its cosine."""
        sim = (
            nn.functional.normalize(query.to(self.keys.dtype), dim=-1)
            @ nn.functional.normalize(self.keys[:tasks], dim=-1).T
        )
        best = sim.max(dim=1)
        return best.indices, best.values


def attach_dual_prompt(vit: nn.Module, config: DualPromptConfig) -> list[ExpertBank]:
    """Wraps the attention of the prompted blocks and adds the pool as ``vit.dual_prompt``."""
    vit = check_vit(vit)
    depth = len(vit.blocks)
    g_blocks = [b for b in config.g_blocks if b < depth]
    e_blocks = [b for b in config.e_blocks if b < depth]
    if not g_blocks and not e_blocks:
        raise ConfigError(f"dualprompt: no prompted block within the ViT's {depth} blocks")
    device, dtype = placement(vit)
    vit.dual_prompt = DualPromptPool(config, g_blocks, e_blocks, vit.embed_dim, device, dtype)
    add_prefix_attention(vit, (*g_blocks, *e_blocks))
    return []


class DualPromptViT(QueriedPromptViT):
    """A :class:`ContinualViT` with DualPrompt's prompts (see the module doc)."""

    @property
    def pool(self) -> DualPromptPool:
        """The backbone's prompt pool."""
        return self.backbone.dual_prompt

    def begin_experience(self, experiences) -> None:
        """Starts an experience; ConfigError once the E-prompt pool is used up."""
        super().begin_experience(experiences)
        if self.experiences_seen > self.pool.config.pool_size:
            raise ConfigError(
                f"dualprompt has {self.pool.config.pool_size} E-prompts, the stream more "
                "experiences: raise --dualprompt-pool-size"
            )

    def prompted(self, x: torch.Tensor, query: torch.Tensor):
        """The G-prompt and the E-prompt of the image's task, as prefixes.

        In training the task is the current experience, and its key-matching loss is kept.
        """
        pool = self.pool
        tasks = max(self.experiences_seen, 1)
        if self.training:
            chosen = torch.full((x.shape[0],), tasks - 1, dtype=torch.long, device=x.device)
            sim = nn.functional.cosine_similarity(query.to(pool.keys.dtype), pool.keys[tasks - 1])
            self._extra_loss = pool.config.key_loss_weight * (1 - sim).mean()
        else:
            chosen, _ = pool.choose(query, tasks)
        layers = {b: p.expand(x.shape[0], -1, -1, -1) for b, p in zip(pool.g_blocks, pool.g)}
        e = pool.e[chosen]  # (B, blocks, 2, L_e, D)
        for j, b in enumerate(pool.e_blocks):
            layers[b] = e[:, j]
        return prefixes_set(
            (self.backbone.blocks[b].attn, (p[:, 0], p[:, 1])) for b, p in layers.items()
        )
