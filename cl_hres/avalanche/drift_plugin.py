"""The plugin that measures how far earlier experiences' features have moved."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from cl_hres.avalanche.feature_probes import FeatureProbes
from cl_hres.avalanche.protocols import CheckpointablePlugin, FeatureProbeOwner

__all__ = ["FeatureDriftPlugin"]


class FeatureDriftPlugin(
    CheckpointablePlugin, FeatureProbeOwner, SupervisedPlugin, supports_distributed=True
):
    """Records, after each experience, how far earlier experiences' features have moved.

    Works with any strategy whose model has a ``features`` method (else its output is
    used). :attr:`history` holds one entry per experience:
    ``{"experience": i, "drift": {j: {"relative": ..., "class_spreads": ...}}}`` for every
    earlier experience ``j`` (see :meth:`FeatureProbes.drift`). The probes are the same
    images on every rank, so under ``torchrun`` every rank reports the same figures. It
    is the figure that tells feature drift apart from head confusion as the cause of
    forgetting.

    Args:
        probe_size: Training images kept per experience, stratified over its classes.
    """

    checkpoint_key = "drift"

    def __init__(self, *, probe_size: int = 64) -> None:
        super().__init__()
        self._probes = FeatureProbes(probe_size)
        self.history: list[dict] = []

    @property
    def probes(self) -> FeatureProbes:
        """The probe images of every experience and their reference features."""
        return self._probes

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The probes and their reference features, as tensors (for checkpoints)."""
        return self.probes.state_dict()

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], history: list[dict], strategy
    ) -> None:
        """Inverse of :meth:`state_dict`; ``history`` comes back from JSON."""
        self.probes.load_state_dict(tensors, torch.device(strategy.device))
        self.history = [dict(h, drift={int(k): v for k, v in h["drift"].items()}) for h in history]

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Stores the experience's probe and measures how far the earlier probes moved."""
        drift = self.probes.update(strategy.model, strategy)
        self.history.append({"experience": len(self.history), "drift": drift})

    def final_drift(self) -> float | None:
        """The largest drift, in class spreads, of any earlier experience after the last one."""
        last = self.history[-1]["drift"] if self.history else {}
        return max((d["class_spreads"] for d in last.values()), default=None)

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars of the last experience.

        ``drift/class_spreads_expNNN`` and ``drift/class_spreads_max``: how far each
        earlier experience's features moved, in spreads of its class means.
        """
        last = self.history[-1]["drift"] if self.history else {}
        spreads = {int(j): float(d["class_spreads"]) for j, d in last.items()}
        out = {f"drift/class_spreads_exp{j:03d}": v for j, v in sorted(spreads.items())}
        if spreads:
            out["drift/class_spreads_max"] = max(spreads.values())
        return out

    def results(self) -> dict[str, Any]:
        """``feature_drift`` (the history) and ``final_feature_drift``."""
        return {"feature_drift": self.history or None, "final_feature_drift": self.final_drift()}
