"""``ContinualViT``: a frozen timm ViT with a parameter-efficient method and a head protocol.

The model knows nothing of Avalanche; plugins call :meth:`ContinualViT.begin_experience`
and :meth:`ContinualViT.end_experience`. Its forward takes optional task labels: each task
label maps to the classes seen with it, so in a task-incremental stream the logits are
restricted to the task's classes (one head per task), and in a class-incremental stream
(every task label 0) to all classes seen so far (no task id needed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cl_hres import distributed, registry
from cl_hres.errors import ConfigError
from cl_hres.nn.adapters import check_vit
from cl_hres.nn.base import adapters, evaluating, placement
from cl_hres.nn.config import check_model_arguments
from cl_hres.nn.experts import ExpertBank
from cl_hres.nn.heads import NCMHead, RidgeHead, StatisticsHead

__all__ = ["ContinualViT"]


class ContinualViT(nn.Module):
    """A timm VisionTransformer adapted by one method, with a class-incremental head.

    Args:
        backbone: A timm ``VisionTransformer`` (any size; its classifier is not used).
        method: A method of :mod:`cl_hres.registry`: ``hres`` (expert banks parallel to
            blocks), ``lora``, ``vpt``, ``linear`` (frozen backbone) or ``finetune``
            (every backbone weight trainable).
        method_config: The method's config (``HResConfig`` / ``LoRAConfig`` /
            ``VPTConfig``); None: its defaults.
        expert_per_experience: For ``hres``/``lora``: a new expert per experience (older
            ones frozen) instead of one expert trained on every experience.
        head: Evaluation head: ``linear`` (the trained linear head), ``ncm`` or ``ridge``.
        ridge: Relative ridge penalty of the ``ridge`` head; None: chosen by GCV.
        ridge_projection: Width of the ridge head's random ReLU projection (0: none).
        balanced_head: Weight every class equally in the ridge head's statistics
            (:class:`~cl_hres.nn.heads.RidgeHead`).
        num_classes: Classes known up front (sizes the linear head, so an untrained model
            can be evaluated); the head still grows if more classes arrive.
        drift_compensation: Map the statistics heads' stored sums through the feature
            drift estimated on each new experience's data (needs
            :meth:`record_features_before` at the start of the experience).
        concat_pretrained: Features are ``[pretrained(x), adapted(x)]``: the frozen
            backbone's features (experts switched off) next to the adapted ones, as APER
            builds its prototypes. Methods whose modules can be switched off only
            (``hres``, ``lora``, ``vpt``; not ``linear`` or ``finetune``).
        adapt_experiences: Train the method's parameters during the first N experiences
            only, then freeze them (first-session adaptation, APER / RanPAC); None: always.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        method: str = "hres",
        method_config: Any = None,
        expert_per_experience: bool = True,
        head: str = "ridge",
        ridge: float | None = None,
        ridge_projection: int = 0,
        balanced_head: bool = False,
        num_classes: int = 0,
        drift_compensation: bool = False,
        concat_pretrained: bool = False,
        adapt_experiences: int | None = None,
    ) -> None:
        super().__init__()
        spec = check_model_arguments(method, head, concat_pretrained, adapt_experiences)
        self.backbone = check_vit(backbone)
        self.method = method
        self.head_kind = head
        self.expert_per_experience = expert_per_experience
        # Drop-out / drop-path would make frozen features stochastic: eval mode for good.
        self.backbone.requires_grad_(spec.trains_backbone)
        if method_config is None and spec.config_class is not None:
            method_config = spec.config_class()
        self.method_config = method_config
        attach = registry.resolve(spec.attach)
        self.banks: list[ExpertBank] = list(attach(self.backbone, method_config)) if attach else []
        self.concat_pretrained = concat_pretrained
        self.adapt_experiences = adapt_experiences
        width = self.backbone.num_features
        self.num_features = 2 * width if concat_pretrained else width
        self.train_head = nn.Linear(self.num_features, num_classes)
        # One statistics head per task label: a class-incremental stream has only task 0;
        # in a task-incremental stream each task's head sees only its own data, so it
        # never changes after its task (its features do not move under NSP).
        self._head_args = dict(ridge=ridge, projection=ridge_projection, balanced=balanced_head)
        self.stats_heads = nn.ModuleDict()
        self.task_classes: dict[int, list[int]] = {}
        self.current_classes: list[int] = []
        self.current_tasks: list[int] = []
        self.experiences_seen = 0
        self.drift_compensation = drift_compensation
        self._features_before: torch.Tensor | None = None
        self.train()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        """Where the model lives (its backbone's device)."""
        return placement(self.backbone)[0]

    def train(self, mode: bool = True) -> ContinualViT:
        """Sets the mode of the heads; the backbone stays in eval mode (frozen statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def stats_head(self, task: int) -> StatisticsHead | None:
        """The statistics head of ``task`` (created on first use; None for ``linear``)."""
        if self.head_kind == "linear":
            return None
        key = str(task)
        if key not in self.stats_heads:
            if self.head_kind == "ridge":
                head = RidgeHead(self.num_features, **self._head_args)
            else:
                head = NCMHead(self.num_features)
            self.stats_heads[key] = head.to(self.device)
        return self.stats_heads[key]

    def ensure_classes(self, num_classes: int) -> None:
        """Makes the logits cover class ids ``< num_classes`` (unseen ones stay ``-inf``)."""
        old = self.train_head
        if num_classes <= old.out_features:
            return
        new = nn.Linear(self.num_features, num_classes, device=old.weight.device)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.train_head = new

    def begin_experience(self, experiences: Iterable[tuple[Iterable[int], Iterable[int]]]) -> None:
        """Prepares training on one or more experiences (several for joint training).

        Args:
            experiences: ``(classes, task_labels)`` of each experience trained now.
        """
        self.current_classes = []
        self.current_tasks = []
        for classes, task_labels in experiences:
            classes = sorted(int(c) for c in classes)
            self.current_tasks = sorted(set(self.current_tasks) | {int(t) for t in task_labels})
            for t in task_labels:
                known = set(self.task_classes.get(int(t), []))
                self.task_classes[int(t)] = sorted(known | set(classes))
            self.current_classes = sorted(set(self.current_classes) | set(classes))
        if not self.current_classes:
            raise ConfigError("an experience without classes cannot be trained")
        self.ensure_classes(max(max(c) for c in self.task_classes.values()) + 1)
        if not self.adapting:
            # First-session adaptation is over: the method's weights (experts live inside
            # the backbone's blocks) stay as they are.
            self.backbone.requires_grad_(False)
        elif self.adds_experts:
            for bank in self.banks:
                # In the wrapped layer's device and dtype; a bank whose null space is
                # empty takes none (ExpertBank.add_expert).
                bank.add_expert()
        self.experiences_seen += 1

    @property
    def adds_experts(self) -> bool:
        """Whether :meth:`begin_experience` offers the banks a new expert.

        One per experience, or the first one, for the experience about to start.
        """
        return (
            self.adapting
            and bool(self.banks)
            and (self.expert_per_experience or self.banks[0].num_experts == 0)
        )

    @property
    def adapting(self) -> bool:
        """Whether the experience being started trains the method's parameters."""
        return self.adapt_experiences is None or self.experiences_seen < self.adapt_experiences

    @property
    def has_statistics_pass(self) -> bool:
        """Whether :meth:`end_experience` runs a forward pass over the experience's data."""
        return self.head_kind != "linear"

    @torch.no_grad()
    def record_features_before(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Keeps the features of the experience's data before training on it.

        Only with ``drift_compensation``: :meth:`end_experience` pairs them with the same
        images' features after training to estimate how the features moved.
        """
        if not (self.drift_compensation and self.has_statistics_pass and self.stats_heads):
            self._features_before = None
            return
        self._features_before = self.collect_features(batches)[0].double()

    def _compensate_drift(self, after: torch.Tensor) -> None:
        """Maps every existing head's statistics through the drift estimated on this data."""
        from cl_hres.nn.drift_compensation import compensate_heads

        before, self._features_before = self._features_before, None
        if before is not None and before.shape == after.shape:
            compensate_heads(self.stats_heads.values(), before, after)

    @torch.no_grad()
    def end_experience(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Adds an experience's training features ``(x, y, task)`` to the statistics heads.

        With ``drift_compensation``, the statistics of earlier experiences are first mapped
        through the affine drift the features of this experience's data underwent
        (:mod:`cl_hres.nn.drift_compensation`).
        """
        if not self.has_statistics_pass:
            return
        f, y, task = self.collect_features(batches)
        if self._features_before is not None:
            self._compensate_drift(f.double())
        self._add_to_heads(
            [(self.stats_head(t), f[task == t], y[task == t]) for t in self.current_tasks]
        )

    @torch.no_grad()
    def collect_features(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluation-mode :meth:`features` (float32), labels and task labels of ``batches``."""
        feats, labels, tasks = [], [], []
        with evaluating(self):
            for x, y, task in batches:
                feats.append(self.features(x.to(self.device)).float())
                labels.append(y.to(self.device))
                tasks.append(task.to(self.device))
        return torch.cat(feats), torch.cat(labels), torch.cat(tasks)

    def _add_to_heads(self, parts: list[tuple[StatisticsHead, torch.Tensor, torch.Tensor]]) -> None:
        """Adds ``(head, features, labels)`` of every process to each head, then fits it.

        Every process calls it with the same heads in the same order (the all-reduces
        pair up).
        """
        before = []
        for head, _, _ in parts:
            # Same class count on every rank, so the buffers can be all-reduced.
            head._grow(self.train_head.out_features)
            before.append({k: v.clone() for k, v in head.statistics().items()})
        for head, f, y in parts:
            # The experience's class sizes over every process, for heads that balance.
            counts = torch.bincount(y, minlength=head.num_classes).double()
            distributed.all_reduce_(counts)
            head.update(f, y, class_counts=counts)
        for (head, _, _), saved in zip(parts, before):
            for k, v in head.statistics().items():
                distributed.all_reduce_increment_(v, saved[k])
            head.fit()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss term of the method's own, added to the task loss in training (None: none).

        Read right after the training forward (e.g. L2P's key matching,
        :class:`~cl_hres.nn.prompt_pool.PromptPoolViT`).
        """
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimizer should receive now."""
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_parameter_count(self) -> int:
        """Parameters the method trains now, excluding the classifier head."""
        head = {id(p) for p in self.train_head.parameters()}
        return sum(p.numel() for p in self.trainable_parameters() if id(p) not in head)

    def adapter_parameter_count_total(self) -> int:
        """Parameters the method added or trained over the stream (frozen experts included)."""
        if registry.METHODS[self.method].trains_backbone:
            return sum(p.numel() for p in self.backbone.parameters())
        return sum(p.numel() for m in adapters(self.backbone) for p in m.adapter_parameters())

    # ---------------------------------------------------------------- forward
    @property
    def backbone_dtype(self) -> torch.dtype:
        """Dtype of the backbone's weights (inputs are cast to it)."""
        return placement(self.backbone)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of the (adapted) backbone, ``(B, num_features)``.

        Images are cast to the backbone's dtype, so a bfloat16 backbone takes float32
        batches (a no-op for a float32 backbone; autocast still applies on top).
        """
        x = self._cast_input(x)  # once for both halves
        adapted = self.backbone_features(x)
        if not self.concat_pretrained:
            return adapted
        with self.experts_disabled(), torch.no_grad():
            pretrained = self.backbone_features(x)
        return torch.cat([pretrained, adapted], dim=-1)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of the backbone as it is, without a pretrained half.

        Its experts are on unless switched off (:meth:`experts_disabled`); images are
        cast to the backbone's dtype as in :meth:`features`.
        """
        tokens = self.backbone.forward_features(self._cast_input(x))
        return self.backbone.forward_head(tokens, pre_logits=True)

    def _cast_input(self, x: torch.Tensor) -> torch.Tensor:
        # A no-op for a float32 backbone or an already cast batch (``.to`` returns ``x``).
        return x.to(self.backbone_dtype) if x.is_floating_point() else x

    @contextmanager
    def experts_disabled(self) -> Iterator[None]:
        """Within the block, the backbone computes its pretrained features (experts off)."""
        # Every Adapter (ExpertBank, PromptedBlock, or a registered method's own module):
        # the protocol a switchable method implements.
        switches = adapters(self.backbone)
        states = [m.enabled for m in switches]
        for m in switches:
            m.enabled = False
        try:
            yield
        finally:
            for m, state in zip(switches, states):
                m.enabled = state

    def _class_mask(
        self, task_labels: torch.Tensor | None, batch: int, num_classes: int
    ) -> torch.Tensor:
        table = torch.zeros(max(self.task_classes, default=0) + 1, num_classes, dtype=torch.bool)
        for t, classes in self.task_classes.items():
            table[t, [c for c in classes if c < num_classes]] = True
        table = table.to(self.device)
        if task_labels is None:
            return table.any(0).expand(batch, -1)
        # Task labels never seen in training fall back to every class seen.
        labels = task_labels.to(self.device).long()
        known = labels < table.shape[0]
        rows = table[labels.clamp_max(table.shape[0] - 1)]
        return torch.where(known.unsqueeze(1), rows, table.any(0).expand(batch, -1))

    def _stats_logits(self, f: torch.Tensor, task_labels: torch.Tensor | None) -> torch.Tensor:
        width = max(
            [self.train_head.out_features, *(h.num_classes for h in self.stats_heads.values())]
        )
        logits = f.new_full((f.shape[0], width), float("-inf"))
        heads = dict(self.stats_heads.items())
        if task_labels is None or len(heads) == 1:
            groups = {next(iter(heads)): torch.ones(f.shape[0], dtype=torch.bool, device=f.device)}
        else:
            labels = task_labels.to(f.device)
            groups = {str(int(t)): labels == t for t in labels.unique()}
        for key, rows in groups.items():
            # A task never trained falls back to the first head (its logits are masked).
            head = heads.get(key, next(iter(heads.values())))
            if head.num_classes:
                logits[rows, : head.num_classes] = head(f[rows])
        return logits

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over every class id seen; classes outside the task are ``-inf``.

        In training mode the linear head is used and restricted to the classes of the
        experience being trained (a local cross-entropy, so old classes' logits are not
        pushed down). In eval mode the configured head is used.
        """
        f = self.features(x)
        if self.training or not self.stats_heads:
            # The head keeps its own dtype (float32) whatever the backbone's; the round
            # trip bfloat16 -> float32 -> bfloat16 under autocast is exact.
            logits = self.train_head(f.to(self.train_head.weight.dtype))
        else:
            # Closed-form heads have large, ill-conditioned weights (tiny ridge): never
            # evaluate them in reduced precision.
            with torch.autocast(device_type=f.device.type, enabled=False):
                logits = self._stats_logits(f.float(), task_labels)
        if self.training:
            mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[self.current_classes] = True
            return logits.masked_fill(~mask, float("-inf"))
        if not self.task_classes:
            return logits
        mask = self._class_mask(task_labels, logits.shape[0], logits.shape[1])
        return logits.masked_fill(~mask, float("-inf"))
