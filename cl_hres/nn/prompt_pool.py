"""Learning to Prompt (L2P, Wang et al., CVPR 2022): a prompt pool chosen by key matching.

A pool of ``M`` prompts (``L_p`` tokens each) with one learnable key per prompt. The query
of an image is the frozen pretrained backbone's pre-logits feature (its prompts switched
off); the ``N`` prompts whose keys are most cosine-similar to it are prepended to the
patch tokens (after the prefix tokens) at the first block and stripped after the last, so
timm's pooling and head see the usual layout. Training adds ``λ · Σ_selected (1 − cos(q,
k))`` (mean over the batch) to the loss, pulling the chosen keys towards their queries.
Every width comes from the ViT (``embed_dim``); nothing is hard-coded.

Differences from the paper, on purpose: the features are timm's pooled pre-logits (the
class token for these backbones) instead of the mean of the prompt tokens' outputs, so
every head protocol of cl-hres reads L2P as it reads the other methods; prompts are chosen
per image (no batch-wise frequency penalty, which the paper uses only on some benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cl_hres.nn.adapters import check_vit
from cl_hres.nn.base import Adapter, placement
from cl_hres.nn.config import L2PConfig
from cl_hres.nn.experts import ExpertBank
from cl_hres.nn.prompt_query import QueriedPromptViT

__all__ = ["PoolStrip", "PromptPool", "PromptPoolViT", "attach_prompt_pool"]


class PromptPool(Adapter, nn.Module):
    """Around the first block: prepends the prompts whose keys best match :attr:`query`.

    Attributes:
        query: ``(B, D)`` pretrained features of the batch, set by :class:`PromptPoolViT`
            before each forward (None: the block runs as the pretrained one).
        key_loss: ``Σ_selected (1 − cos(q, k))`` averaged over the last batch.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        width: int,
        config: L2PConfig,
        num_prefix_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.num_prefix_tokens = num_prefix_tokens
        # Uniform in [-1, 1) for prompts and keys, as the paper's code initialises them.
        self.prompts = nn.Parameter(
            torch.empty(config.pool_size, config.length, width, device=device, dtype=dtype)
        )
        self.keys = nn.Parameter(torch.empty(config.pool_size, width, device=device, dtype=dtype))
        nn.init.uniform_(self.prompts, -1, 1)
        nn.init.uniform_(self.keys, -1, 1)
        self.query: torch.Tensor | None = None
        self.key_loss: torch.Tensor | None = None
        # Whether the forward under way inserted prompts (read by PoolStrip at the end).
        self.inserted = False
        self.enabled = True

    @property
    def tokens(self) -> int:
        """Prompt tokens inserted per image (``N · L_p``)."""
        return self.config.top_k * self.config.length

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The prompts and their keys."""
        return [self.prompts, self.keys]

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(B, N)`` of the best-matching prompts and their cosine similarities."""
        sim = (
            nn.functional.normalize(query.to(self.keys.dtype), dim=-1)
            @ nn.functional.normalize(self.keys, dim=-1).T
        )
        best = sim.topk(self.config.top_k, dim=1)
        return best.indices, best.values

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Prepends the chosen prompts (after the prefix tokens), then runs the block."""
        self.inserted = self.enabled and self.query is not None
        if not self.inserted:
            return self.base_layer(x, *args, **kwargs)
        idx, sim = self.select(self.query)
        self.key_loss = (1 - sim).sum(1).mean()
        chosen = self.prompts[idx].reshape(x.shape[0], self.tokens, -1).to(x.dtype)
        npfx = self.num_prefix_tokens
        x = torch.cat([x[:, :npfx], chosen, x[:, npfx:]], dim=1)
        return self.base_layer(x, *args, **kwargs)


class PoolStrip(Adapter, nn.Module):
    """Around the last block: removes the tokens the pool inserted in this forward."""

    def __init__(self, base_layer: nn.Module, pool: PromptPool) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A reference, not a submodule: the pool is registered where it sits (block 0).
        self.__dict__["_pool"] = pool
        self.enabled = True

    def adapter_parameters(self) -> list[nn.Parameter]:
        """None: the pool holds the prompts."""
        return []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The block's output without the pool's prompt tokens."""
        x = self.base_layer(x, *args, **kwargs)
        pool = self.__dict__["_pool"]
        if not (self.enabled and pool.inserted):
            return x
        npfx = pool.num_prefix_tokens
        return torch.cat([x[:, :npfx], x[:, npfx + pool.tokens :]], dim=1)


def attach_prompt_pool(vit: nn.Module, config: L2PConfig) -> list[ExpertBank]:
    """Wraps the first block in a :class:`PromptPool` and strips its tokens after the last."""
    vit = check_vit(vit)
    device, dtype = placement(vit)
    pool = PromptPool(
        vit.blocks[0],
        width=vit.embed_dim,
        config=config,
        num_prefix_tokens=vit.num_prefix_tokens,
        device=device,
        dtype=dtype,
    )
    vit.blocks[0] = pool
    vit.blocks[-1] = PoolStrip(vit.blocks[-1], pool)
    return []


class PromptPoolViT(QueriedPromptViT):
    """A :class:`ContinualViT` whose prompts are chosen by the pretrained features' query."""

    @property
    def pool(self) -> PromptPool:
        """The backbone's prompt pool."""
        return next(m for m in self.backbone.modules() if isinstance(m, PromptPool))

    @contextmanager
    def prompted(self, x: torch.Tensor, query: torch.Tensor) -> Iterator[None]:
        """The pool reads ``query`` in this forward; its key-matching loss is kept after."""
        pool = self.pool
        pool.query = query
        try:
            yield
        finally:
            pool.query = None
        if pool.key_loss is not None:
            self._extra_loss = pool.config.key_loss_weight * pool.key_loss
