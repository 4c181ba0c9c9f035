"""Avalanche plugins: the algorithms, usable with any Avalanche strategy.

* :class:`ContinualViTPlugin` adds experts / grows the head when an experience starts and
  feeds the head statistics when it ends.
* :class:`NullSpaceProjectionPlugin` collects the old inputs' covariance after each
  experience and keeps new experts' ``down`` weights in its null space after every step.
* :class:`FeatureDriftPlugin` measures, for any strategy, how far the features of earlier
  experiences have moved, in units of the distance between class means: the figure that
  tells feature drift apart from head confusion as the cause of forgetting.

Their results do not depend on their order in ``plugins=[...]``: the one pass over an
experience's data that feeds the head and the covariance runs once, from whichever
plugin's ``after_training_exp`` comes first, and the probe set of each experience is
stored and measured once and shared by the drift and interference figures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Subset

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


def experience_key(strategy) -> int:
    """Identifies the training experience being ended (Avalanche's count of earlier ones)."""
    return strategy.clock.train_exp_counter


def eval_batches(strategy) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, task)`` batches of the data just trained on, with eval transforms, in order.

    Under torch.distributed each rank gets its ``rank::world`` shard.
    """
    dataset = distributed.shard(strategy.adapted_dataset.eval())
    loader = DataLoader(dataset, batch_size=strategy.eval_mb_size, shuffle=False)
    for batch in loader:
        x, y = batch[0], batch[1]
        # Datasets without task labels (class-incremental streams) are task 0.
        t = batch[2] if len(batch) >= 3 else torch.zeros_like(y)
        yield x.to(strategy.device), y.to(strategy.device), t.to(strategy.device)


def model_features(model, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a ContinualViT (or the output of any other model)."""
    return model.features(x) if hasattr(model, "features") else model(x)


def stratified_indices(targets: Sequence[int], size: int) -> list[int]:
    """Up to ``size`` indices spread evenly over the classes of ``targets``.

    Round robin over the classes in increasing order, each class's items in dataset
    order, so every class gets ``size // C`` or one more item (fewer if it has fewer).
    No random numbers are drawn.
    """
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    for r in range(max(map(len, queues), default=0)):
        for q in queues:
            if r < len(q) and len(chosen) < size:
                chosen.append(q[r])
    return sorted(chosen)


def _targets(dataset) -> list[int] | None:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        return [int(t) for t in targets]
    except (TypeError, ValueError):
        return None


@torch.no_grad()
def probe_batch(strategy, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images of the experience just trained, stratified over its classes.

    Evaluation transforms; the same images on every rank (the whole dataset, not a shard).
    """
    dataset = strategy.adapted_dataset.eval()
    targets = _targets(dataset)
    if targets is None:
        indices = list(range(min(size, len(dataset))))
    else:
        indices = stratified_indices(targets, size)
    loader = DataLoader(Subset(dataset, indices), batch_size=max(1, len(indices)), shuffle=False)
    xs, ys = zip(*((b[0], b[1]) for b in loader))
    return torch.cat(xs).to(strategy.device), torch.cat(ys).to(strategy.device)


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
            delta = model_features(model, x).double() - ref
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
            was_training = model.training
            model.eval()
            self._last = self.drift(model)
            self.add(model, strategy)
            model.train(was_training)
            self._updated_at = key
        return self._last

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


def _find(strategy, plugin_type: type):
    return next((p for p in strategy.plugins if isinstance(p, plugin_type)), None)


class ContinualViTPlugin(SupervisedPlugin, supports_distributed=True):
    """Starts and ends experiences of a :class:`~cl_hres.model.ContinualViT`.

    Experts are created in ``after_train_dataset_adaptation``, which Avalanche runs before
    ``make_optimizer``, so the new parameters reach the optimizer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pass_done_at: int | None = None

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        strategy.model.begin_experience(
            [
                # Class-incremental experiences built from plain datasets have no task labels.
                (exp.classes_in_this_experience, getattr(exp, "task_labels", [0]))
                for exp in experiences_in_training(strategy)
            ]
        )
        strategy.model.to(strategy.device)

    def before_training_exp(self, strategy, **kwargs) -> None:
        # The features before training, for drift compensation (a no-op without it). The
        # new experts start at zero, so these are the previous model's features.
        if getattr(strategy.model, "drift_compensation", False):
            strategy.model.record_features_before(eval_batches(strategy))

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.statistics_pass_once(strategy)

    def statistics_pass_once(self, strategy) -> None:
        """The experience's one pass over its data, for the head and the covariance.

        Feeds the statistics head and every plugin with a ``statistics_pass`` context
        (the NSP covariance) in the same forward passes. Runs once per experience, from
        whichever plugin asks first, so the order of the plugins does not matter.
        """
        key = experience_key(strategy)
        if self._pass_done_at == key:
            return
        self._pass_done_at = key
        model = strategy.model
        if not model.has_statistics_pass:
            return  # a linear head: the plugins that need a pass make their own
        with ExitStack() as stack:
            for plugin in strategy.plugins:
                if plugin is not self and hasattr(plugin, "statistics_pass"):
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
    with one expert per experience. The covariance and the projector of each bank are
    buffers of the model (``bank.null_space``), saved with its state dict. After each
    experience it records diagnostics in :attr:`history`: the null-space dimension and
    the number of experts per bank (a bank whose null space is empty takes no new expert,
    so it costs no more at inference), and the relative change of the features of the
    probe set of every earlier experience (measured interference).

    Args:
        config: Threshold rule, its parameter, relaxation and precision.
        probe_size: Training images kept per experience to measure interference, when
            the strategy has no :class:`FeatureDriftPlugin` (else its probes are used).
    """

    def __init__(self, config: NullSpaceConfig | None = None, *, probe_size: int = 64) -> None:
        super().__init__()
        self.config = config or NullSpaceConfig()
        self.guard: NullSpaceGuard | None = None
        self.probes = FeatureProbes(probe_size)
        self.history: list[dict] = []
        self._fed_at: int | None = None
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
        drift = _find(strategy, FeatureDriftPlugin)
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

        :class:`ContinualViTPlugin` enters it around its statistics-head pass. Feeds the
        covariance once per experience; a second pass in the same experience is ignored.
        """
        key = experience_key(strategy)
        if self._fed_at == key:
            return nullcontext()
        self._fed_at = key
        return self._guard(strategy).collecting()

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
        key = experience_key(strategy)
        cvit = _find(strategy, ContinualViTPlugin)
        if self._fed_at != key and cvit is not None:
            cvit.statistics_pass_once(strategy)  # feeds us, whatever the plugin order
        if self._fed_at != key:  # no shared pass (a linear head, another strategy)
            was_training = model.training
            model.eval()
            with self.statistics_pass(strategy):
                for x, _, _ in eval_batches(strategy):
                    model_features(model, x)
            model.train(was_training)
        # The covariance and projectors are up to date before the history is written.
        drift = self._probes(strategy).update(model, strategy)
        self.history.append(
            {
                "experience": len(self.history),
                "null_space_dims": list(guard.null_dims),
                "input_dims": [b.in_features for b in guard.banks],
                # Inference cost: each bank evaluates experts × rank bottleneck units.
                "experts": [b.num_experts for b in guard.banks],
                "interference": {j: d["relative"] for j, d in drift.items()},
            }
        )


class FeatureDriftPlugin(SupervisedPlugin, supports_distributed=True):
    """Records, after each experience, how far earlier experiences' features have moved.

    Works with any strategy whose model has a ``features`` method (else its output is
    used). :attr:`history` holds one entry per experience:
    ``{"experience": i, "drift": {j: {"relative": ..., "class_spreads": ...}}}`` for every
    earlier experience ``j`` (see :meth:`FeatureProbes.drift`). The probes are the same
    images on every rank, so under ``torchrun`` every rank reports the same figures.

    Args:
        probe_size: Training images kept per experience, stratified over its classes.
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

    def after_training_exp(self, strategy, **kwargs) -> None:
        drift = self.probes.update(strategy.model, strategy)
        self.history.append({"experience": len(self.history), "drift": drift})

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
