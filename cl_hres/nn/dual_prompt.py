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
from cl_hres.nn.model import ContinualViT

__all__ = ["DualPromptPool", "DualPromptViT", "PrefixAttention", "attach_dual_prompt"]


class PrefixAttention(Adapter, nn.Module):
    """A timm ``Attention`` whose keys and values get :attr:`prefix` tokens in front.

    Attributes:
        prefix: ``(keys, values)``, each ``(B, L, D)``, set by the model for one forward
            (None: the wrapped attention as it is).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.enabled = True

    def adapter_parameters(self) -> list[nn.Parameter]:
        """None: the pool holds the prompts."""
        return []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Attention over ``[prefix keys; token keys]`` and ``[prefix values; token values]``."""
        if not self.enabled or self.prefix is None:
            return self.base_layer(x, *args, **kwargs)
        a = self.base_layer
        b, n, _ = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        pk, pv = (
            p.to(x.dtype).reshape(b, -1, a.num_heads, a.head_dim).transpose(1, 2)
            for p in self.prefix
        )
        # Prefix keys enter as given (prefix-tuning learns the keys themselves).
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        drop = a.attn_drop.p if self.training else 0.0
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = a.norm(out.transpose(1, 2).reshape(b, n, a.num_heads * a.head_dim))
        if getattr(a, "gate", None) is not None:
            out = out * a.gate(x).sigmoid()
        return a.proj_drop(a.proj(out))


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
    for b in (*g_blocks, *e_blocks):
        vit.blocks[b].attn = PrefixAttention(vit.blocks[b].attn)
    return []


class DualPromptViT(ContinualViT):
    """A :class:`ContinualViT` with DualPrompt's prompts (see the module doc)."""

    _key_loss: torch.Tensor | None = None

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

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features with the G-prompt and the E-prompt of the image's task."""
        pool = self.pool
        if not pool.enabled:
            return super().backbone_features(x)
        with self.experts_disabled(), torch.no_grad():
            query = super().backbone_features(x)
        tasks = max(self.experiences_seen, 1)
        if self.training:
            chosen = torch.full((x.shape[0],), tasks - 1, dtype=torch.long, device=x.device)
            sim = nn.functional.cosine_similarity(query.to(pool.keys.dtype), pool.keys[tasks - 1])
            self._key_loss = (1 - sim).mean()
        else:
            chosen, _ = pool.choose(query, tasks)
        layers = dict(zip(pool.g_blocks, pool.g.unbind(0)))
        e = pool.e[chosen]  # (B, blocks, 2, L_e, D)
        for j, b in enumerate(pool.e_blocks):
            layers[b] = e[:, j]
        attns = {b: self.backbone.blocks[b].attn for b in layers}
        for b, p in layers.items():
            p = p.expand(x.shape[0], -1, -1, -1) if p.dim() == 3 else p
            attns[b].prefix = (p[:, 0], p[:, 1])
        try:
            return super().backbone_features(x)
        finally:
            for attn in attns.values():
                attn.prefix = None

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``λ ·`` the key-matching loss of the last training forward."""
        loss, self._key_loss = self._key_loss, None
        return None if loss is None else self.pool.config.key_loss_weight * loss
