"""What the runner and the plugins know of each other: three small protocols.

* :class:`CheckpointablePlugin`: a plugin whose state goes into the run's checkpoints and
  whose history goes into TensorBoard and ``results.json``. The runner finds these plugins
  over ``strategy.plugins`` (:func:`checkpointable_plugins`) and names none of them.
* :class:`StatisticsPassListener`: a plugin that feeds on the one pass over an
  experience's data that :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin` makes for the
  statistics head (the NSP covariance rides on it).
* :class:`ExpertAdmission`: a plugin that decides, from a pass over a new experience's
  data made before its experts are created, which expert banks take one (NSP: not those
  whose free directions the new data does not reach).
* :class:`StatisticsPassProvider`: the plugin that makes that one pass
  (:class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin`), for a listener that must
  know whether it ran or make a pass of its own.
* :class:`FeatureProbeOwner`: a plugin that keeps probe images of every experience and
  shares them, so that two plugins measuring old features use the same images.

All are abstract base classes, so a plugin says what it is by inheriting, not by
happening to have a method of the right name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, ClassVar, TypeVar

import torch

__all__ = [
    "CheckpointablePlugin",
    "ExpertAdmission",
    "FeatureProbeOwner",
    "StatisticsPassListener",
    "StatisticsPassProvider",
    "checkpointable_plugins",
    "find_plugin",
]

P = TypeVar("P")


class CheckpointablePlugin(ABC):
    """A plugin whose state a run checkpoints after every experience and then reports.

    After each experience the runner saves every such plugin's :meth:`state_dict` as
    ``<checkpoint_key>.<name>`` tensors and its :attr:`history` (JSON) under
    ``histories[<checkpoint_key>]``, and logs its :meth:`scalars` to TensorBoard; at the
    end it merges its :meth:`results` into ``results.json``. On ``--resume`` it hands
    both back through :meth:`load_state_dict`.

    Attributes:
        checkpoint_key: Prefix of the plugin's tensors in a checkpoint and key of its
            history; unique among a strategy's plugins, and fixed once checkpoints exist.
        history: One JSON-able entry per experience.
    """

    checkpoint_key: ClassVar[str] = ""
    history: list[dict[str, Any]]

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The plugin's tensors (model state excluded: the model's state dict has it)."""

    @abstractmethod
    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], history: list[dict[str, Any]], strategy
    ) -> None:
        """Inverse of :meth:`state_dict`; ``history`` comes back from JSON.

        Args:
            tensors: What :meth:`state_dict` returned, without the key prefix.
            history: :attr:`history` as saved (integer dict keys turned into strings).
            strategy: The strategy the plugin belongs to (device, model, other plugins).
        """

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars after the last experience (default: none)."""
        return {}

    def results(self) -> dict[str, Any]:
        """Entries of ``results.json`` at the end of a run (default: none)."""
        return {}


class StatisticsPassListener(ABC):
    """A plugin fed by the experience's one statistics pass over its data."""

    @abstractmethod
    def statistics_pass(self, strategy) -> AbstractContextManager:
        """Context in which the pass's forward passes feed this plugin.

        Entered by :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin` at most once per
        experience, around the pass that feeds the statistics head.
        """


class ExpertAdmission(ABC):
    """A plugin that decides from the new experience's data which banks take an expert."""

    @abstractmethod
    def admission_pass(self, strategy) -> AbstractContextManager | None:
        """Context in which a pass over the new experience's data informs the decision.

        :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin` makes the pass (forward only, eval
        mode) before it creates the experience's experts, so the plugin's decision is in
        place whatever the order of the plugins.

        Returns:
            The context, or None when the plugin needs no pass for this experience.
        """


class StatisticsPassProvider(ABC):
    """The plugin that makes an experience's one pass over its data."""

    @abstractmethod
    def statistics_pass_once(self, strategy) -> bool:
        """Runs the pass unless it ran for this experience; whether listeners were fed.

        False means the model has no statistics pass (a linear head): a listener must
        then make a pass of its own.
        """


class FeatureProbeOwner(ABC):
    """A plugin that stores probe images of every experience and lends them to others."""

    @property
    @abstractmethod
    def probes(self) -> Any:
        """Its :class:`~cl_hres.avalanche.feature_probes.FeatureProbes`."""


def find_plugin(strategy, plugin_type: type[P]) -> P | None:
    """The first of ``strategy.plugins`` that is a ``plugin_type``, or None."""
    return next((p for p in strategy.plugins if isinstance(p, plugin_type)), None)


def checkpointable_plugins(strategy) -> dict[str, CheckpointablePlugin]:
    """The strategy's :class:`CheckpointablePlugin` s by checkpoint key, in plugin order.

    Raises:
        ValueError: Two plugins share a key (their checkpointed state would mix).
    """
    found: dict[str, CheckpointablePlugin] = {}
    for plugin in strategy.plugins:
        if not isinstance(plugin, CheckpointablePlugin):
            continue
        key = plugin.checkpoint_key
        if not key or key in found:
            raise ValueError(
                f"{type(plugin).__name__} needs a checkpoint_key of its own, got {key!r}"
            )
        found[key] = plugin
    return found
