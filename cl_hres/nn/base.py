"""What every module a method adds to a frozen ViT provides, and where a module lives.

* :class:`Adapter`: the protocol of the modules a method adds (expert banks, prompt
  blocks). The model finds them by type, never by parameter names: their
  :meth:`~Adapter.adapter_parameters` are what the method added (counted as its
  parameters), and their :attr:`~Adapter.enabled` switch turns them off together so the
  backbone computes its pretrained features (the ``[pretrained, adapted]`` head).
* :func:`placement`: the device and floating dtype of a module, the one way every
  part of cl-hres asks where new tensors must go.
* :func:`evaluating`: a module in eval mode within a block, its mode restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["Adapter", "adapters", "evaluating", "placement"]


class Adapter:
    """Mixin of the ``nn.Module`` s that a method adds to a ViT.

    Attributes:
        enabled: False makes the module compute what the pretrained backbone computes
            (a plain attribute: never part of the state).
    """

    enabled: bool = True

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters this module added to the backbone (not the wrapped layer's)."""
        raise NotImplementedError


def adapters(module: nn.Module) -> list[Adapter]:
    """Every :class:`Adapter` inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, Adapter)]


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``module``'s first floating parameter (else buffer).

    A module without floating tensors lives on the CPU in the default dtype.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module`` is in eval mode; its previous mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
