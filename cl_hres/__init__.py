"""cl-hres: continual learning on frozen Vision Transformers.

The core (experts, null-space projection, heads, model) imports no Avalanche; the
Avalanche plugins and strategies live in :mod:`cl_hres.avalanche` and
:mod:`cl_hres.avalanche.strategies`. Every name below is imported from its module on first use.
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
    "ContinualViT": "cl_hres.nn.model",
    "ContinualViTPlugin": "cl_hres.avalanche",
    "CovarianceAccumulator": "cl_hres.nsp.guard",
    "DataError": "cl_hres.errors",
    "ExpertBank": "cl_hres.nn.experts",
    "HRes": "cl_hres.avalanche.strategies",
    "HResConfig": "cl_hres.nn.config",
    "HResNSP": "cl_hres.avalanche.strategies",
    "LoRAConfig": "cl_hres.nn.config",
    "LoRALinear": "cl_hres.nn.experts",
    "NCMHead": "cl_hres.nn.heads",
    "NullSpaceConfig": "cl_hres.nsp.config",
    "NullSpaceGuard": "cl_hres.nsp.guard",
    "NullSpaceProjectionPlugin": "cl_hres.avalanche",
    "ParallelBlock": "cl_hres.nn.experts",
    "RidgeHead": "cl_hres.nn.heads",
    "VPTConfig": "cl_hres.nn.config",
    "create_backbone": "cl_hres.nn.backbones",
    "null_space_projector": "cl_hres.nsp.guard",
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
