"""Avalanche plugins: the algorithms, usable with any Avalanche strategy.

* :class:`ContinualViTPlugin` adds experts / grows the head when an experience starts and
  feeds the head statistics when it ends.
* :class:`NullSpaceProjectionPlugin` collects the old inputs' covariance after each
  experience and keeps new experts' ``down`` weights in its null space after every step.
* :class:`FeatureDriftPlugin` measures, for any strategy, how far the features of earlier
  experiences have moved, in units of the distance between class means: the figure that
  tells feature drift apart from head confusion as the cause of forgetting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from cl_hres import distributed
from cl_hres.config import NullSpaceConfig
from cl_hres.errors import ClHresError
from cl_hres.null_space import NullSpaceGuard
from cl_hres.vit_adapters import expert_banks

__all__ = [
    "ContinualViTPlugin",
    "FeatureDriftPlugin",
    "FeatureProbes",
    "FiniteLossPlugin",
    "NullSpaceProjectionPlugin",
    "TrainingDivergedError",
]


def experiences_in_training(strategy) -> list:
    """The experiences of the current ``train`` call (all of them for JointTraining)."""
    return list(getattr(strategy, "_experiences", None) or [strategy.experience])


def eval_batches(
    strategy, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, task)`` batches of the data just trained on, with eval transforms, in order."""
    dataset = distributed.shard(strategy.adapted_dataset.eval())
    loader = DataLoader(dataset, batch_size=strategy.eval_mb_size, shuffle=False)
    seen = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        # Datasets without task labels (class-incremental streams) are task 0.
        t = batch[2] if len(batch) >= 3 else torch.zeros_like(y)
        if limit is not None:
            x, y, t = x[: limit - seen], y[: limit - seen], t[: limit - seen]
        yield x.to(strategy.device), y.to(strategy.device), t.to(strategy.device)
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            return


def model_features(model, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a ContinualViT (or the output of any other model)."""
    return model.features(x) if hasattr(model, "features") else model(x)


class FeatureProbes:
    """A fixed probe batch per experience and its features right after that experience.

    Args:
        size: Images kept per experience (the first ``size`` of its training data, with
            evaluation transforms).
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, model, strategy) -> None:
        """Stores a probe of the experience just trained and its current features."""
        x, y, _ = (torch.cat(parts) for parts in zip(*eval_batches(strategy, self.size)))
        self.x.append(x)
        self.y.append(y)
        self.ref.append(model_features(model, x))

    @torch.no_grad()
    def drift(self, model) -> dict[int, dict[str, float]]:
        """How far each stored probe's features have moved since it was stored.

        Returns:
            ``{j: {"relative": ‖F − F_ref‖ / ‖F_ref‖, "class_spreads": rms_drift / spread}}``
            where ``spread`` is the RMS distance of the class means of every probe's
            current features from their centroid (one model, so drift does not inflate
            it): at about 1, features of old classes have moved as far as the classes are
            apart, and head statistics collected back then are stale.
        """
        if not self.x:
            return {}
        now = [model_features(model, x).double() for x in self.x]
        feats, y = torch.cat(now), torch.cat(self.y)
        means = torch.stack([feats[y == c].mean(0) for c in y.unique()])
        spread = float((means - means.mean(0)).pow(2).sum(1).mean().sqrt())
        out = {}
        for j, (f_now, f) in enumerate(zip(now, self.ref)):
            delta = f_now - f.double()
            rms = float(delta.pow(2).sum(1).mean().sqrt())
            out[j] = {
                "relative": float(delta.norm() / f.double().norm().clamp_min(1e-12)),
                "class_spreads": rms / max(spread, 1e-12),
            }
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for j, (x, y, f) in enumerate(zip(self.x, self.y, self.ref)):
            out[f"probe{j}.x"], out[f"probe{j}.y"], out[f"probe{j}.f"] = x, y, f
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.x, self.y, self.ref = [], [], []
        while f"probe{len(self.x)}.x" in tensors:
            j = len(self.x)
            self.x.append(tensors[f"probe{j}.x"].to(device))
            self.y.append(tensors[f"probe{j}.y"].to(device))
            self.ref.append(tensors[f"probe{j}.f"].to(device))


class ContinualViTPlugin(SupervisedPlugin, supports_distributed=True):
    """Starts and ends experiences of a :class:`~cl_hres.model.ContinualViT`.

    Experts are created in ``after_train_dataset_adaptation``, which Avalanche runs before
    ``make_optimizer``, so the new parameters reach the optimizer.
    """

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        strategy.model.begin_experience(
            [
                # Class-incremental experiences built from plain datasets have no task labels.
                (exp.classes_in_this_experience, getattr(exp, "task_labels", [0]))
                for exp in experiences_in_training(strategy)
            ]
        )
        strategy.model.to(strategy.device)

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        with ExitStack() as stack:
            if model.has_statistics_pass:
                # One pass over the data feeds the head and every plugin that shares it
                # (the NSP covariance), instead of one pass each.
                for plugin in strategy.plugins:
                    if hasattr(plugin, "statistics_pass"):
                        stack.enter_context(plugin.statistics_pass(strategy))
            model.end_experience(eval_batches(strategy))

    def before_eval_exp(self, strategy, **kwargs) -> None:
        # Test streams hold classes not trained yet: their logits must exist (as -inf)
        # for the loss, as Avalanche's IncrementalClassifier grows before evaluation.
        classes = strategy.experience.classes_in_this_experience
        if classes:
            strategy.model.ensure_classes(max(classes) + 1)


class NullSpaceProjectionPlugin(SupervisedPlugin, supports_distributed=True):
    """Null-space projection of new experts (see :mod:`cl_hres.null_space`).

    Works with any strategy whose model contains :class:`~cl_hres.experts.ExpertBank` s
    with one expert per experience. After each experience it records diagnostics in
    :attr:`history`: the null-space dimension per bank and the relative change of the
    features of a probe batch of every earlier experience (measured interference).

    Args:
        config: Threshold rule, its parameter, relaxation and precision.
        probe_size: Training images kept per experience to measure interference.
    """

    def __init__(self, config: NullSpaceConfig | None = None, *, probe_size: int = 64) -> None:
        super().__init__()
        self.config = config or NullSpaceConfig()
        self.guard: NullSpaceGuard | None = None
        self.probes = FeatureProbes(probe_size)
        self.history: list[dict] = []
        self._collected = False

    def _guard(self, strategy) -> NullSpaceGuard:
        if self.guard is None:
            banks = expert_banks(strategy.model)
            if not banks:
                raise ValueError("NullSpaceProjectionPlugin needs a model with expert banks")
            self.guard = NullSpaceGuard(banks, self.config)
        return self.guard

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Covariance statistics and interference probes, as tensors (for checkpoints)."""
        if self.guard is None:
            return {}
        return {
            **{f"guard.{k}": v for k, v in self.guard.state_dict().items()},
            **self.probes.state_dict(),
        }

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], history: list[dict], strategy
    ) -> None:
        """Inverse of :meth:`state_dict`; ``history`` comes back from JSON."""
        device = torch.device(strategy.device)
        prefix = "guard."
        self._guard(strategy).load_state_dict(
            {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        )
        self.probes.load_state_dict(tensors, device)
        # JSON turned the integer keys of the interference dicts into strings.
        self.history = [
            dict(h, interference={int(k): v for k, v in h["interference"].items()}) for h in history
        ]

    def statistics_pass(self, strategy) -> AbstractContextManager:
        """Context in which another plugin's pass over the experience's data feeds the covariance.

        :class:`ContinualViTPlugin` enters it around its statistics-head pass in
        ``after_training_exp`` (before this plugin's), which saves a second pass.
        """
        self._collected = True
        return self._guard(strategy).collecting()

    def before_training_exp(self, strategy, **kwargs) -> None:
        # The new expert's initial down weights must already lie in the null space.
        self._guard(strategy).project_weights()

    def after_backward(self, strategy, **kwargs) -> None:
        self._guard(strategy).project_grads()

    def after_update(self, strategy, **kwargs) -> None:
        self._guard(strategy).project_weights()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        guard = self._guard(strategy)
        model = strategy.model
        was_training = model.training
        model.eval()
        if not self._collected:  # no shared pass ran (e.g. a linear head, another strategy)
            guard.collect(
                lambda x: model_features(model, x), (x for x, _, _ in eval_batches(strategy))
            )
        self._collected = False
        interference = {j: d["relative"] for j, d in self.probes.drift(model).items()}
        self.probes.add(model, strategy)
        self.history.append(
            {
                "experience": len(self.history),
                "null_space_dims": list(guard.null_dims),
                "input_dims": [b.in_features for b in guard.banks],
                "interference": interference,
            }
        )
        model.train(was_training)


class FeatureDriftPlugin(SupervisedPlugin, supports_distributed=True):
    """Records, after each experience, how far earlier experiences' features have moved.

    Works with any strategy whose model has a ``features`` method (else its output is
    used). :attr:`history` holds one entry per experience:
    ``{"experience": i, "drift": {j: {"relative": ..., "class_spreads": ...}}}`` for every
    earlier experience ``j`` (see :meth:`FeatureProbes.drift`). Under ``torchrun`` each
    rank measures its own shard; rank 0's figures are reported.

    Args:
        probe_size: Training images kept per experience.
    """

    def __init__(self, *, probe_size: int = 64) -> None:
        super().__init__()
        self.probes = FeatureProbes(probe_size)
        self.history: list[dict] = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The probes and their reference features, as tensors (for checkpoints)."""
        return self.probes.state_dict()

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], history: list[dict], strategy
    ) -> None:
        """Inverse of :meth:`state_dict`; ``history`` comes back from JSON."""
        self.probes.load_state_dict(tensors, torch.device(strategy.device))
        self.history = [dict(h, drift={int(k): v for k, v in h["drift"].items()}) for h in history]

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        was_training = model.training
        model.eval()
        drift = self.probes.drift(model)
        self.probes.add(model, strategy)
        self.history.append({"experience": len(self.history), "drift": drift})
        model.train(was_training)

    def final_drift(self) -> float | None:
        """The largest drift, in class spreads, of any earlier experience after the last one."""
        last = self.history[-1]["drift"] if self.history else {}
        return max((d["class_spreads"] for d in last.values()), default=None)


class TrainingDivergedError(ClHresError):
    """The loss became NaN or Inf."""


class FiniteLossPlugin(SupervisedPlugin, supports_distributed=True):
    """Stops training when the loss is not finite, checked once per epoch.

    The per-step check stays on the device (a running flag), so it adds no host-device
    synchronisation to the training step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._bad: torch.Tensor | None = None

    def before_backward(self, strategy, **kwargs) -> None:
        bad = ~torch.isfinite(strategy.loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def after_training_epoch(self, strategy, **kwargs) -> None:
        bad = (
            self._bad
            if self._bad is not None
            else torch.zeros((), dtype=torch.bool, device=strategy.device)
        )
        self._bad = None
        # Every rank must stop together, or the others would wait forever in the next
        # all-reduce.
        if distributed.any_rank(bad):
            raise TrainingDivergedError(
                f"loss became NaN/Inf in experience {strategy.clock.train_exp_counter + 1}, "
                f"epoch {strategy.clock.train_exp_epochs + 1}; lower --lr"
            )
