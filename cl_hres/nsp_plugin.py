"""The plugin that keeps new experts in the null space of old inputs (NSP)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from cl_hres.config import NullSpaceConfig
from cl_hres.drift_plugin import FeatureDriftPlugin
from cl_hres.experience_data import eval_batches, evaluating, model_features
from cl_hres.feature_probes import FeatureProbes
from cl_hres.metrics import plugin_scalars
from cl_hres.null_space import NullSpaceGuard
from cl_hres.plugin_protocols import (
    CheckpointablePlugin,
    ExpertAdmission,
    StatisticsPassListener,
    find_plugin,
)
from cl_hres.vit_adapters import expert_banks
from cl_hres.vit_plugin import ContinualViTPlugin

__all__ = ["NullSpaceProjectionPlugin"]


class NullSpaceProjectionPlugin(
    CheckpointablePlugin,
    StatisticsPassListener,
    ExpertAdmission,
    SupervisedPlugin,
    supports_distributed=True,
):
    """Null-space projection of new experts (see :mod:`cl_hres.null_space`).

    Works with any strategy whose model contains :class:`~cl_hres.experts.ExpertBank` s
    with one expert per experience. The covariance and the projector of each bank are
    buffers of the model (``bank.null_space``), saved with its state dict. The covariance
    is fed by :class:`~cl_hres.vit_plugin.ContinualViTPlugin`'s statistics pass when the
    strategy has one, else by a pass of this plugin's own. After each experience it
    records diagnostics in :attr:`history`: the null-space dimension and the number of
    experts per bank (a bank whose null space is empty takes no new expert, so it costs
    no more at inference; nor does a bank *dormant* for the experience, whose free
    directions held less than ``config.min_free_energy`` of the experience's input energy,
    or less than ``config.min_selectivity`` times the old inputs' share, in the admission
    pass that :class:`~cl_hres.vit_plugin.ContinualViTPlugin` makes
    before creating experts: ``dormant``), the share of the experience's input energy that the projector
    let its experts learn from (``free_energy``, per bank; None for the first) and the
    same share of the older experiences' inputs (``old_free_energy``), and the relative
    change of the features of the probe set of every earlier experience
    (measured interference).

    Args:
        config: Threshold rule, its parameter, relaxation and precision.
        probe_size: Training images kept per experience to measure interference, when
            the strategy has no :class:`FeatureDriftPlugin` (else its probes are used).
    """

    checkpoint_key = "nsp"

    def __init__(self, config: NullSpaceConfig | None = None, *, probe_size: int = 64) -> None:
        super().__init__()
        self.config = config or NullSpaceConfig()
        self.guard: NullSpaceGuard | None = None
        self.probes = FeatureProbes(probe_size)
        self.history: list[dict] = []
        self._borrowed_probes = False

    def attach(self, model) -> NullSpaceGuard:
        """Gives every expert bank of ``model`` its null-space state; returns the guard.

        Idempotent. Call it before loading, into a fresh model, a state dict saved with
        NSP state (strategies of :mod:`cl_hres.strategies` do it when they are built).
        """
        if self.guard is None:
            banks = expert_banks(model)
            if not banks:
                raise ValueError("NullSpaceProjectionPlugin needs a model with expert banks")
            self.guard = NullSpaceGuard(banks, self.config)
        return self.guard

    def _guard(self, strategy) -> NullSpaceGuard:
        return self.attach(strategy.model)

    def _probes(self, strategy) -> FeatureProbes:
        """The strategy's FeatureDriftPlugin's probes if it has one, else this plugin's."""
        drift = find_plugin(strategy, FeatureDriftPlugin)
        self._borrowed_probes = drift is not None
        return drift.probes if drift is not None else self.probes

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The interference probes, unless they belong to a FeatureDriftPlugin.

        The covariance statistics and projectors are in the model's state dict.
        """
        return {} if self._borrowed_probes else self.probes.state_dict()

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], history: list[dict], strategy
    ) -> None:
        """Inverse of :meth:`state_dict`; ``history`` comes back from JSON."""
        self.attach(strategy.model)
        if self._probes(strategy) is self.probes:
            self.probes.load_state_dict(tensors, torch.device(strategy.device))
        # JSON turned the integer keys of the interference dicts into strings.
        self.history = [
            dict(h, interference={int(k): v for k, v in h["interference"].items()}) for h in history
        ]

    def statistics_pass(self, strategy) -> AbstractContextManager:
        """Context in which another plugin's pass over the experience's data feeds the covariance.

        :class:`~cl_hres.vit_plugin.ContinualViTPlugin` enters it, once per experience,
        around its statistics-head pass.
        """
        return self._guard(strategy).collecting()

    def admission_pass(self, strategy) -> AbstractContextManager | None:
        """Context in which a pass over the new experience's data picks dormant banks.

        :meth:`~cl_hres.null_space.NullSpaceGuard.admitting`; None when it could make no
        bank dormant (:attr:`~cl_hres.null_space.NullSpaceGuard.needs_admission_pass`).
        """
        guard = self._guard(strategy)
        return guard.admitting() if guard.needs_admission_pass else None

    def before_training_exp(self, strategy, **kwargs) -> None:
        # The new expert's initial down weights must already lie in the null space.
        self._guard(strategy).project_weights()

    def after_backward(self, strategy, **kwargs) -> None:
        self._guard(strategy).project_grads()

    def before_update(self, strategy, **kwargs) -> None:
        self._guard(strategy).begin_update()

    def after_update(self, strategy, **kwargs) -> None:
        self._guard(strategy).project_weights()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        guard = self._guard(strategy)
        model = strategy.model
        vit = find_plugin(strategy, ContinualViTPlugin)
        # The shared pass feeds us whatever the plugin order (it runs once per experience);
        # without one (a linear head, another strategy) the covariance needs its own pass.
        if vit is None or not vit.statistics_pass_once(strategy):
            with evaluating(model), guard.collecting():
                for x, _, _ in eval_batches(strategy):
                    model_features(model, x)
        # The covariance and projectors are up to date before the history is written.
        drift = self._probes(strategy).update(model, strategy)
        self.history.append(
            {
                "experience": len(self.history),
                "null_space_dims": list(guard.null_dims),
                "input_dims": [b.in_features for b in guard.banks],
                # Inference cost: each bank evaluates experts × rank bottleneck units.
                "experts": [b.num_experts for b in guard.banks],
                # Banks that took no expert for this experience: their free directions
                # held too little of its input energy (NullSpaceGuard.admitting).
                "dormant": guard.dormant_banks,
                # What decided it, measured before training (None: no admission pass):
                # the new and the old inputs' shares of energy in the free directions.
                "admission_free_energy": list(guard.admission_energy),
                "admission_old_free_energy": list(guard.admission_old_energy),
                # Shares of this experience's input energy, and of the older experiences',
                # in the directions its experts were free to learn in.
                "free_energy": [None if f is None else f[0] for f in guard.free_energy],
                "old_free_energy": [None if f is None else f[1] for f in guard.free_energy],
                "interference": {j: d["relative"] for j, d in drift.items()},
            }
        )
        guard.wake()

    def scalars(self) -> dict[str, float]:
        """``nsp/`` scalars of the last experience (:func:`cl_hres.metrics.plugin_scalars`)."""
        return plugin_scalars(self.history[-1] if self.history else None, None)

    def results(self) -> dict[str, Any]:
        """``null_space``: the history."""
        return {"null_space": self.history or None}
