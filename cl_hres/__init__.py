"""cl-hres: continual learning on frozen Vision Transformers.

The core (experts, null-space projection, heads, model) imports no Avalanche; the
Avalanche plugins and strategies live in :mod:`cl_hres.plugins` and
:mod:`cl_hres.strategies`. Every name below is imported from its module on first use.
"""

from cl_hres import _warnings
from cl_hres._version import __version__

# Before Avalanche is imported: it imports qpsolvers, which warns on import.
_warnings.install()

# Every public name is imported on first use: `cl-hres --help` and the config checks then
# need neither torch (~3 s) nor Avalanche (~6 s, ~1 GB).
_LAZY = {
    "CheckpointError": "cl_hres.errors",
    "ClHresError": "cl_hres.errors",
    "ConfigError": "cl_hres.errors",
    "ContinualViT": "cl_hres.model",
    "ContinualViTPlugin": "cl_hres.plugins",
    "CovarianceAccumulator": "cl_hres.null_space",
    "DataError": "cl_hres.errors",
    "ExpertBank": "cl_hres.experts",
    "HRes": "cl_hres.strategies",
    "HResConfig": "cl_hres.config",
    "HResNSP": "cl_hres.strategies",
    "LoRAConfig": "cl_hres.config",
    "LoRALinear": "cl_hres.experts",
    "NCMHead": "cl_hres.heads",
    "NullSpaceConfig": "cl_hres.config",
    "NullSpaceGuard": "cl_hres.null_space",
    "NullSpaceProjectionPlugin": "cl_hres.plugins",
    "ParallelBlock": "cl_hres.experts",
    "RidgeHead": "cl_hres.heads",
    "VPTConfig": "cl_hres.config",
    "create_backbone": "cl_hres.backbones",
    "null_space_projector": "cl_hres.null_space",
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
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cl_hres' has no attribute {name!r}")
