"""Probe images per experience and how far their features move (drift, interference)."""

from __future__ import annotations

import torch

from cl_hres.avalanche.experience_data import experience_key, model_features, probe_batch
from cl_hres.nn.base import evaluating

__all__ = ["FeatureProbes", "class_spread"]


def class_spread(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RMS distance of the class means of ``features`` from their centroid.

    With a single class, the RMS distance of the features from their mean. Used on a
    probe's reference features, which no later training can change, so the yardstick
    cannot collapse when a model's features do.
    """
    f = features.double()
    classes = labels.unique()
    if classes.numel() >= 2:
        f = torch.stack([f[labels == c].mean(0) for c in classes])
    return (f - f.mean(0)).pow(2).sum(1).mean().sqrt()


class FeatureProbes:
    """One probe set per experience, stratified over its classes, with reference features.

    The reference features are those of the model right after the probe's experience.
    :meth:`update` measures drift and stores the new probe once per experience, so
    several plugins can share one instance (one set of images in the checkpoint, one
    forward pass per probe).

    Args:
        size: Images kept per experience (training data with evaluation transforms,
            spread evenly over the experience's classes).
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []
        self._updated_at: int | None = None
        self._last: dict[int, dict[str, float]] = {}

    @torch.no_grad()
    def add(self, model, strategy) -> None:
        """Stores a probe of the experience just trained and its current features."""
        x, y = probe_batch(strategy, self.size)
        self.x.append(x)
        self.y.append(y)
        self.ref.append(model_features(model, x))

    @torch.no_grad()
    def drift(self, model) -> dict[int, dict[str, float]]:
        """How far each stored probe's features have moved since it was stored.

        Returns:
            ``{j: {"relative": ‖F − F_ref‖ / ‖F_ref‖, "class_spreads": rms_drift / spread_j}}``
            where ``spread_j`` is :func:`class_spread` of probe j's reference features
            (the classes of experience j, right after it was learned): at about 1,
            features of old classes have moved as far as those classes were apart, and
            head statistics collected back then are stale.
        """
        out = {}
        for j, (x, y, f) in enumerate(zip(self.x, self.y, self.ref)):
            ref = f.double()
            # A model whose head features grow (a view per experience, cl_hres.nn.views)
            # keeps the old ones in front: drift is measured on what existed back then.
            delta = model_features(model, x).double()[:, : ref.shape[1]] - ref
            rms = float(delta.pow(2).sum(1).mean().sqrt())
            out[j] = {
                "relative": float(delta.norm() / ref.norm().clamp_min(1e-12)),
                "class_spreads": rms / max(float(class_spread(ref, y)), 1e-12),
            }
        return out

    @torch.no_grad()
    def update(self, model, strategy) -> dict[int, dict[str, float]]:
        """Once per experience: drift of the stored probes, then this experience's probe.

        Later calls for the same experience return the same figures without a pass.
        """
        key = experience_key(strategy)
        if self._updated_at != key:
            with evaluating(model):
                self._last = self.drift(model)
                self.add(model, strategy)
            self._updated_at = key
        return self._last

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The probe images, labels and reference features, as ``probe{j}.x|y|f``."""
        out = {}
        for j, (x, y, f) in enumerate(zip(self.x, self.y, self.ref)):
            out[f"probe{j}.x"], out[f"probe{j}.y"], out[f"probe{j}.f"] = x, y, f
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Inverse of :meth:`state_dict`, onto ``device``."""
        self.x, self.y, self.ref = [], [], []
        while f"probe{len(self.x)}.x" in tensors:
            j = len(self.x)
            self.x.append(tensors[f"probe{j}.x"].to(device))
            self.y.append(tensors[f"probe{j}.y"].to(device))
            self.ref.append(tensors[f"probe{j}.f"].to(device))
