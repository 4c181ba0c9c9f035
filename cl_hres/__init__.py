"""cl-hres: continual learning on frozen Vision Transformers.

The core (experts, null-space projection, heads, model) imports no Avalanche; the
Avalanche plugins and strategies live in :mod:`cl_hres.plugins` and
:mod:`cl_hres.strategies` and are imported from here lazily.
"""

from cl_hres._version import __version__
from cl_hres.backbones import create_backbone
from cl_hres.config import HResConfig, LoRAConfig, NullSpaceConfig, VPTConfig
from cl_hres.errors import CheckpointError, ClHresError, ConfigError, DataError
from cl_hres.experts import ExpertBank, LoRALinear, ParallelBlock
from cl_hres.heads import NCMHead, RidgeHead
from cl_hres.model import ContinualViT
from cl_hres.null_space import CovarianceAccumulator, NullSpaceGuard, null_space_projector

_LAZY = {
    "ContinualViTPlugin": "cl_hres.plugins",
    "HRes": "cl_hres.strategies",
    "HResNSP": "cl_hres.strategies",
    "NullSpaceProjectionPlugin": "cl_hres.plugins",
}

__all__ = [
    "CheckpointError",
    "ClHresError",
    "ConfigError",
    "ContinualViT",
    "ContinualViTPlugin",
    "CovarianceAccumulator",
    "DataError",
    "ExpertBank",
    "HRes",
    "HResConfig",
    "HResNSP",
    "LoRAConfig",
    "LoRALinear",
    "NCMHead",
    "NullSpaceConfig",
    "NullSpaceGuard",
    "NullSpaceProjectionPlugin",
    "ParallelBlock",
    "RidgeHead",
    "VPTConfig",
    "__version__",
    "create_backbone",
    "null_space_projector",
]


def __getattr__(name: str):
    # Avalanche costs ~6 s and ~1 GB to import: only pay for it when a strategy is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cl_hres' has no attribute {name!r}")
