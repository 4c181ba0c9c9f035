"""CODA-Prompt (Smith et al., CVPR 2023): prompts assembled from attention-weighted components.

Each prompted block ``b`` holds ``M`` components ``P_{b,m} ∈ R^{L×D}`` with a key
``K_{b,m}`` and an attention vector ``A_{b,m}`` (both ``R^D``). For the query ``q`` (the
frozen pretrained backbone's pre-logits feature) the block's prompt is
``Σ_m α_m P_{b,m}`` with ``α_m = cos(q ⊙ A_{b,m}, K_{b,m})``; its first ``L/2`` tokens are
prefix keys, the rest prefix values of the block's attention
(:class:`~cl_hres.nn.prompt_query.PrefixAttention`). The components are split evenly over
``tasks`` experiences: experience ``t`` uses components ``[0, (t+1)·M/T)`` and trains only
its own ``M/T`` (earlier ones enter detached), which start orthogonal to every earlier
component (Gram-Schmidt, where the dimension allows). Training adds
``ortho_weight · Σ ‖C Cᵀ − I‖²`` over the active components (0: off, as the paper's
ImageNet-R setting). Every width comes from the ViT.
"""

from __future__ import annotations

import torch
from torch import nn

from cl_hres.errors import ConfigError
from cl_hres.nn.adapters import check_vit
from cl_hres.nn.base import Adapter, placement
from cl_hres.nn.config import CodaPromptConfig
from cl_hres.nn.experts import ExpertBank
from cl_hres.nn.prompt_query import QueriedPromptViT, add_prefix_attention, prefixes_set

__all__ = ["CodaPromptPool", "CodaPromptViT", "attach_coda_prompt", "orthogonal_rows"]


def orthogonal_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new``'s rows made orthonormal to each other and to ``old``'s rows (Gram-Schmidt).

    Where ``old`` and ``new`` together have more rows than the dimension, no such basis
    exists: ``new`` is returned as it is (the paper's setting never meets this).
    """
    rows, dim = old.shape[0] + new.shape[0], new.shape[1]
    if rows > dim:
        return new
    basis = torch.linalg.qr(torch.cat([old, new]).double().T).Q.T  # (rows, dim)
    return basis[old.shape[0] :].to(new.dtype) * new.norm(dim=1, keepdim=True)


class CodaPromptPool(Adapter, nn.Module):
    """Components, keys and attention vectors of every prompted block (``vit.coda_prompt``)."""

    def __init__(
        self,
        config: CodaPromptConfig,
        blocks: list[int],
        width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config, self.blocks = config, blocks
        m, kw = config.pool_size, dict(device=device, dtype=dtype)
        self.components = nn.Parameter(torch.empty(len(blocks), m, config.length, width, **kw))
        self.keys = nn.Parameter(torch.empty(len(blocks), m, width, **kw))
        self.attention = nn.Parameter(torch.empty(len(blocks), m, width, **kw))
        for p in (self.components, self.keys, self.attention):
            nn.init.uniform_(p, -1, 1)
        self.enabled = True

    @property
    def per_task(self) -> int:
        """Components each experience adds."""
        return self.config.pool_size // self.config.tasks

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Components, keys and attention vectors."""
        return [self.components, self.keys, self.attention]

    @torch.no_grad()
    def start_task(self, t: int) -> None:
        """Initialises experience ``t``'s components orthogonal to the earlier ones."""
        lo, hi = t * self.per_task, (t + 1) * self.per_task
        for p in (self.components, self.keys, self.attention):
            for b in range(p.shape[0]):
                flat = p[b].reshape(p.shape[1], -1)
                flat[lo:hi] = orthogonal_rows(flat[:lo], flat[lo:hi])

    def active(self, p: torch.Tensor, t: int) -> torch.Tensor:
        """``p``'s components of experiences ``0..t``, the earlier ones detached."""
        lo, hi = t * self.per_task, (t + 1) * self.per_task
        return torch.cat([p[:, :lo].detach(), p[:, lo:hi]], dim=1)

    def prompts(self, query: torch.Tensor, t: int) -> torch.Tensor:
        """``(blocks, B, L, D)``: each block's prompt for each image."""
        q = query.to(self.keys.dtype)
        keys, attn = self.active(self.keys, t), self.active(self.attention, t)
        weighted = nn.functional.normalize(q[None, :, None, :] * attn[:, None], dim=-1)
        alpha = (weighted * nn.functional.normalize(keys, dim=-1)[:, None]).sum(-1)  # (b, B, M')
        return torch.einsum("kbm,kmld->kbld", alpha, self.active(self.components, t))

    def ortho_loss(self, t: int) -> torch.Tensor:
        """``Σ ‖C Cᵀ − I‖²`` over the active components, keys and attention vectors."""
        loss = self.keys.new_zeros(())
        for p in (self.components, self.keys, self.attention):
            flat = self.active(p, t).flatten(2)  # (blocks, M', n)
            gram = flat @ flat.transpose(1, 2)
            eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            loss = loss + ((gram - eye) ** 2).sum()
        return loss


def attach_coda_prompt(vit: nn.Module, config: CodaPromptConfig) -> list[ExpertBank]:
    """Wraps the prompted blocks' attention and adds the pool as ``vit.coda_prompt``."""
    vit = check_vit(vit)
    blocks = [b for b in config.blocks if b < len(vit.blocks)]
    if not blocks:
        raise ConfigError(f"coda-prompt: no prompted block within the ViT's {len(vit.blocks)}")
    device, dtype = placement(vit)
    vit.coda_prompt = CodaPromptPool(config, blocks, vit.embed_dim, device, dtype)
    add_prefix_attention(vit, blocks)
    return []


class CodaPromptViT(QueriedPromptViT):
    """A :class:`ContinualViT` with CODA-Prompt's components (see the module doc)."""

    @property
    def pool(self) -> CodaPromptPool:
        """The backbone's component pool."""
        return self.backbone.coda_prompt

    @property
    def task(self) -> int:
        """The experience being trained or last trained (0-based)."""
        return max(self.experiences_seen, 1) - 1

    def begin_experience(self, experiences) -> None:
        """Starts an experience with its own new components (ConfigError when used up)."""
        super().begin_experience(experiences)
        if self.experiences_seen > self.pool.config.tasks:
            raise ConfigError(
                f"coda-prompt splits its components over {self.pool.config.tasks} "
                "experiences, the stream has more: raise --coda-prompt-tasks"
            )
        self.pool.start_task(self.task)

    def prompted(self, x: torch.Tensor, query: torch.Tensor):
        """Each block's prompt assembled for ``query``, as its prefix.

        In training, also the orthogonality penalty (when its weight is not 0).
        """
        pool = self.pool
        prompts = pool.prompts(query, self.task)
        half = pool.config.length // 2
        if self.training and pool.config.ortho_weight:
            self._extra_loss = pool.config.ortho_weight * pool.ortho_loss(self.task)
        return prefixes_set(
            (self.backbone.blocks[b].attn, (p[:, :half], p[:, half:]))
            for b, p in zip(pool.blocks, prompts)
        )
