"""Avalanche plugins: the algorithms, usable with any Avalanche strategy.

* :class:`ContinualViTPlugin` (:mod:`cl_hres.avalanche.vit_plugin`) adds experts / grows the head
  when an experience starts and feeds the head statistics when it ends.
* :class:`NullSpaceProjectionPlugin` (:mod:`cl_hres.avalanche.nsp_plugin`) collects the old
  inputs' covariance after each experience and keeps new experts' ``down`` weights in
  its null space after every step.
* :class:`FeatureDriftPlugin` (:mod:`cl_hres.avalanche.drift_plugin`) measures, for any strategy,
  how far the features of earlier experiences have moved, in units of the distance
  between class means: the figure that tells feature drift apart from head confusion as
  the cause of forgetting.
* :class:`FiniteLossPlugin` (:mod:`cl_hres.avalanche.finite_loss`) stops a run whose loss is NaN.

Their results do not depend on their order in ``plugins=[...]``: the one pass over an
experience's data that feeds the head and the covariance runs once, from whichever
plugin's ``after_training_exp`` comes first, and the probe set of each experience
(:mod:`cl_hres.avalanche.feature_probes`) is stored and measured once and shared by the drift and
interference figures. What the runner and the plugins know of each other is in
:mod:`cl_hres.avalanche.protocols`; the data helpers are in :mod:`cl_hres.avalanche.experience_data`.
This module gathers the public names.
"""

from cl_hres.avalanche.drift_plugin import FeatureDriftPlugin
from cl_hres.avalanche.experience_data import (
    eval_batches,
    experience_key,
    experiences_in_training,
    model_features,
    probe_batch,
    stratified_indices,
)
from cl_hres.avalanche.feature_probes import FeatureProbes, class_spread
from cl_hres.avalanche.finite_loss import FiniteLossPlugin, TrainingDivergedError
from cl_hres.avalanche.nsp_plugin import NullSpaceProjectionPlugin
from cl_hres.avalanche.protocols import (
    CheckpointablePlugin,
    StatisticsPassListener,
    checkpointable_plugins,
    find_plugin,
)
from cl_hres.avalanche.vit_plugin import ContinualViTPlugin

__all__ = [
    "CheckpointablePlugin",
    "ContinualViTPlugin",
    "FeatureDriftPlugin",
    "FeatureProbes",
    "FiniteLossPlugin",
    "NullSpaceProjectionPlugin",
    "StatisticsPassListener",
    "TrainingDivergedError",
    "checkpointable_plugins",
    "class_spread",
    "eval_batches",
    "experience_key",
    "experiences_in_training",
    "find_plugin",
    "model_features",
    "probe_batch",
    "stratified_indices",
]
