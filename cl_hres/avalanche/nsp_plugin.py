"""The plugin that keeps new experts in the null space of old inputs (NSP)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from cl_hres.avalanche.experience_data import eval_batches, model_features
from cl_hres.avalanche.feature_probes import FeatureProbes
from cl_hres.avalanche.protocols import (
    CheckpointablePlugin,
    ExpertAdmission,
    FeatureProbeOwner,
    StatisticsPassListener,
    StatisticsPassProvider,
    find_plugin,
)
from cl_hres.nn.adapters import expert_banks
from cl_hres.nn.base import evaluating
from cl_hres.nsp.config import NullSpaceConfig
from cl_hres.nsp.guard import NullSpaceGuard

__all__ = ["NullSpaceProjectionPlugin"]


class NullSpaceProjectionPlugin(
    CheckpointablePlugin,
    StatisticsPassListener,
    ExpertAdmission,
    SupervisedPlugin,
    supports_distributed=True,
):
    """Null-space projection of new experts (see :mod:`cl_hres.nsp.guard`).

    Works with any strategy whose model contains :class:`~cl_hres.nn.experts.ExpertBank` s
    with one expert per experience. The covariance and the projector of each bank are
    buffers of the model (``bank.null_space``), saved with its state dict. The covariance
    is fed by :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin`'s statistics pass when the
    strategy has one, else by a pass of this plugin's own. After each experience it
    records diagnostics in :attr:`history`: the null-space dimension and the number of
    experts per bank (a bank whose null space is empty takes no new expert, so it costs
    no more at inference; nor does a bank *dormant* for the experience, whose free
    directions held less than ``config.min_free_energy`` of the experience's input energy,
    or less than ``config.min_selectivity`` times the old inputs' share, in the admission
    pass that :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin` makes
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
        NSP state (strategies of :mod:`cl_hres.avalanche.strategies` do it when they are built).
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
        """The probes of another plugin that owns some (drift), else this plugin's."""
        owner = next(
            (p for p in strategy.plugins if isinstance(p, FeatureProbeOwner) and p is not self),
            None,
        )
        self._borrowed_probes = owner is not None
        return owner.probes if owner is not None else self.probes

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

        :class:`~cl_hres.avalanche.vit_plugin.ContinualViTPlugin` enters it, once per experience,
        around its statistics-head pass.
        """
        return self._guard(strategy).collecting()

    def admission_pass(self, strategy) -> AbstractContextManager | None:
        """Context in which a pass over the new experience's data picks dormant banks.

        :meth:`~cl_hres.nsp.guard.NullSpaceGuard.admitting`; None when it could make no
        bank dormant (:attr:`~cl_hres.nsp.guard.NullSpaceGuard.needs_admission_pass`).
        """
        guard = self._guard(strategy)
        return guard.admitting() if guard.needs_admission_pass else None

    def before_training_exp(self, strategy, **kwargs) -> None:
        """Puts the new experts' initial ``down`` weights into the null space."""
        # The new expert's initial down weights must already lie in the null space.
        self._guard(strategy).project_weights()

    def after_backward(self, strategy, **kwargs) -> None:
        """Projects the new experts' gradients into the null space."""
        self._guard(strategy).project_grads()

    def before_update(self, strategy, **kwargs) -> None:
        """Marks the start of an optimizer step (the guard notes what it may move)."""
        self._guard(strategy).begin_update()

    def after_update(self, strategy, **kwargs) -> None:
        """Projects the new experts' ``down`` weights back into the null space after the step."""
        self._guard(strategy).project_weights()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        """Adds the experience's inputs to the covariance and records the diagnostics."""
        guard = self._guard(strategy)
        model = strategy.model
        provider = find_plugin(strategy, StatisticsPassProvider)
        # The shared pass feeds us whatever the plugin order (it runs once per experience);
        # without one (a linear head, another strategy) the covariance needs its own pass.
        if provider is None or not provider.statistics_pass_once(strategy):
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
        """TensorBoard scalars of the last experience.

        ``nsp/null_space_dims/blockNN``: null-space dimension of each adapted block;
        ``nsp/null_space_fraction``: its mean fraction of the input dimension;
        ``nsp/free_energy/blockNN``: share of the experience's input energy that each
        block's projector let through (from the second experience on);
        ``nsp/interference_max``: the largest relative change of an earlier experience's
        features.
        """
        if not self.history:
            return {}
        last = self.history[-1]
        dims, inputs = last["null_space_dims"], last["input_dims"]
        out = {f"nsp/null_space_dims/block{b:02d}": float(d) for b, d in enumerate(dims)}
        if dims:
            out["nsp/null_space_fraction"] = sum(d / n for d, n in zip(dims, inputs)) / len(dims)
        for b, share in enumerate(last.get("free_energy") or []):
            if share is not None:
                out[f"nsp/free_energy/block{b:02d}"] = float(share)
        if last.get("interference"):
            out["nsp/interference_max"] = float(max(last["interference"].values()))
        return out

    def results(self) -> dict[str, Any]:
        """``null_space``: the history."""
        return {"null_space": self.history or None}
