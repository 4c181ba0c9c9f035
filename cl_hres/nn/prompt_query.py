"""What the query-based prompt methods (L2P, DualPrompt, CODA-Prompt) share.

* :class:`QueriedPromptViT`: the query of an image is the frozen pretrained backbone's
  pre-logits feature (the method's modules switched off, no gradient); the prompted
  forward runs with the state the query chooses set on the backbone's modules, which is
  cleared afterwards whatever happens.
* :class:`PrefixAttention`: prefix-tuning of a timm ``Attention`` (DualPrompt,
  CODA-Prompt), and :func:`add_prefix_attention` to wrap the chosen blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cl_hres.nn.base import Adapter
from cl_hres.nn.model import ContinualViT

__all__ = ["PrefixAttention", "QueriedPromptViT", "add_prefix_attention", "prefixes_set"]


class QueriedPromptViT(ContinualViT):
    """Base of a method whose prompts depend on the pretrained features of the image.

    Subclasses give :attr:`pool` (an Adapter holding the prompts) and :meth:`prompted`;
    a loss term they compute there goes to ``self._extra_loss``, read once by
    :meth:`auxiliary_loss`.
    """

    _extra_loss: torch.Tensor | None = None

    @property
    def pool(self) -> Adapter:  # pragma: no cover
        """The module that holds the method's prompts."""
        raise NotImplementedError

    def prompted(self, x: torch.Tensor, query: torch.Tensor):  # pragma: no cover
        """Context in which the backbone's forward of ``x`` uses the prompts ``query`` chose."""
        raise NotImplementedError

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features with the prompts chosen by the query of ``x``."""
        if not self.pool.enabled:
            return super().backbone_features(x)
        with self.experts_disabled(), torch.no_grad():
            query = super().backbone_features(x)
        with self.prompted(x, query):
            return super().backbone_features(x)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The method's loss term of the last forward that computed one (read once)."""
        loss, self._extra_loss = self._extra_loss, None
        return loss


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


def add_prefix_attention(vit: nn.Module, blocks: Iterable[int]) -> None:
    """Wraps the attention of each of ``blocks`` in :class:`PrefixAttention`."""
    for b in blocks:
        vit.blocks[b].attn = PrefixAttention(vit.blocks[b].attn)


@contextmanager
def prefixes_set(
    prefixes: Iterable[tuple[PrefixAttention, tuple[torch.Tensor, torch.Tensor]]],
) -> Iterator[None]:
    """Within the block, each attention has its ``(keys, values)`` prefix; cleared after."""
    attns = []
    try:
        for attn, prefix in prefixes:
            attn.prefix = prefix
            attns.append(attn)
        yield
    finally:
        for attn in attns:
            attn.prefix = None
