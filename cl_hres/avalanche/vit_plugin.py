"""The plugin that starts and ends the experiences of a ContinualViT."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from avalanche.core import SupervisedPlugin

from cl_hres.avalanche.experience_data import eval_batches, experience_key, experiences_in_training
from cl_hres.avalanche.protocols import (
    ExpertAdmission,
    StatisticsPassListener,
    StatisticsPassProvider,
)
from cl_hres.nn.base import evaluating

__all__ = ["ContinualViTPlugin"]


class ContinualViTPlugin(StatisticsPassProvider, SupervisedPlugin, supports_distributed=True):
    """Starts and ends experiences of a :class:`~cl_hres.nn.model.ContinualViT`.

    Experts are created in ``after_train_dataset_adaptation``, which Avalanche runs before
    ``make_optimizer``, so the new parameters reach the optimizer; just before, when an
    :class:`~cl_hres.avalanche.protocols.ExpertAdmission` plugin asks for one, a forward pass
    over the experience's data lets it decide which banks take an expert. After the
    experience, one pass over its data feeds the statistics head and every
    :class:`~cl_hres.avalanche.protocols.StatisticsPassListener` among the strategy's plugins.
    """

    def __init__(self) -> None:
        super().__init__()
        # The experience whose pass has run, and whether it fed the listeners.
        self._pass_done_at: int | None = None
        self._pass_fed = False

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        """Starts the experience on the model: admission pass (NSP), experts, class bookkeeping."""
        if strategy.model.adds_experts:
            self._admission_pass(strategy)
        strategy.model.begin_experience(
            [
                # Class-incremental experiences built from plain datasets have no task labels.
                (exp.classes_in_this_experience, getattr(exp, "task_labels", [0]))
                for exp in experiences_in_training(strategy)
            ]
        )
        strategy.model.to(strategy.device)

    @torch.no_grad()
    def _admission_pass(self, strategy) -> None:
        contexts = [
            ctx
            for plugin in strategy.plugins
            if isinstance(plugin, ExpertAdmission)
            and (ctx := plugin.admission_pass(strategy)) is not None
        ]
        if not contexts:
            return
        model = strategy.model.to(strategy.device)
        # Iterating a DataLoader draws from the global generator: forked, so that the
        # experts and head rows created next are initialised as without the pass.
        with evaluating(model), torch.random.fork_rng(devices=[]), ExitStack() as stack:
            for ctx in contexts:
                stack.enter_context(ctx)
            for x, _, _ in eval_batches(strategy):
                # The banks' inputs only: the pretrained half of concatenated features
                # is not read by any expert.
                model.backbone_features(x)

    def before_training_exp(self, strategy, **kwargs) -> None:
        """Records the features before training, for drift compensation (if on)."""
        # The features before training, for drift compensation (a no-op without it). The
        # new experts start at zero, so these are the previous model's features.
        if getattr(strategy.model, "drift_compensation", False):
            strategy.model.record_features_before(eval_batches(strategy))

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Runs the experience's statistics pass (once, whichever plugin asks first)."""
        self.statistics_pass_once(strategy)

    def statistics_pass_once(self, strategy) -> bool:
        """The experience's one pass over its data, for the head and the listeners.

        Feeds the statistics head and every :class:`StatisticsPassListener` plugin (the
        NSP covariance) in the same forward passes. Runs once per experience, from
        whichever plugin asks first, so the order of the plugins does not matter.

        Returns:
            Whether the listeners were fed (now or earlier in this experience); False
            when the model has no statistics pass (a linear head), in which case a
            listener must make a pass of its own.
        """
        key = experience_key(strategy)
        if self._pass_done_at == key:
            return self._pass_fed
        self._pass_done_at = key
        model = strategy.model
        self._pass_fed = bool(model.has_statistics_pass)
        if self._pass_fed:
            with ExitStack() as stack:
                for plugin in strategy.plugins:
                    if isinstance(plugin, StatisticsPassListener):
                        stack.enter_context(plugin.statistics_pass(strategy))
                model.end_experience(eval_batches(strategy))
        return self._pass_fed

    def before_eval_exp(self, strategy, **kwargs) -> None:
        """Grows the logits to the evaluated experience's classes (unseen ones -inf)."""
        # Test streams hold classes not trained yet: their logits must exist (as -inf)
        # for the loss, as Avalanche's IncrementalClassifier grows before evaluation.
        classes = strategy.experience.classes_in_this_experience
        if classes:
            strategy.model.ensure_classes(max(classes) + 1)
