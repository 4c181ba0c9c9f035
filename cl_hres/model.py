"""``ContinualViT``: a frozen timm ViT with a parameter-efficient method and a head protocol.

The model knows nothing of Avalanche; plugins call :meth:`ContinualViT.begin_experience`
and :meth:`ContinualViT.end_experience`. Its forward takes optional task labels: each task
label maps to the classes seen with it, so in a task-incremental stream the logits are
restricted to the task's classes (one head per task), and in a class-incremental stream
(every task label 0) to all classes seen so far (no task id needed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cl_hres import distributed
from cl_hres.config import HEAD_CHOICES, HResConfig, LoRAConfig, VPTConfig
from cl_hres.errors import ConfigError
from cl_hres.experts import ExpertBank
from cl_hres.heads import NCMHead, RidgeHead, StatisticsHead
from cl_hres.vit_adapters import add_hres_experts, add_lora_experts, add_vpt_prompts, check_vit

__all__ = ["METHODS", "ContinualViT"]

METHODS = ("finetune", "hres", "linear", "lora", "vpt")


class ContinualViT(nn.Module):
    """A timm VisionTransformer adapted by one method, with a class-incremental head.

    Args:
        backbone: A timm ``VisionTransformer`` (any size; its classifier is not used).
        method: ``hres`` (expert banks parallel to blocks), ``lora``, ``vpt``, ``linear``
            (frozen backbone) or ``finetune`` (every backbone weight trainable).
        method_config: ``HResConfig`` / ``LoRAConfig`` / ``VPTConfig`` for the method.
        expert_per_experience: For ``hres``/``lora``: a new expert per experience (older
            ones frozen) instead of one expert trained on every experience.
        head: Evaluation head: ``linear`` (the trained linear head), ``ncm`` or ``ridge``.
        ridge: Relative ridge penalty of the ``ridge`` head; None: chosen by GCV.
        ridge_projection: Width of the ridge head's random ReLU projection (0: none).
        num_classes: Classes known up front (sizes the linear head, so an untrained model
            can be evaluated); the head still grows if more classes arrive.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        method: str = "hres",
        method_config: HResConfig | LoRAConfig | VPTConfig | None = None,
        expert_per_experience: bool = True,
        head: str = "ridge",
        ridge: float | None = None,
        ridge_projection: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if head not in HEAD_CHOICES:
            raise ConfigError(f"unknown head {head!r}; choose from {', '.join(HEAD_CHOICES)}")
        self.backbone = check_vit(backbone)
        self.method = method
        self.head_kind = head
        self.expert_per_experience = expert_per_experience
        # Drop-out / drop-path would make frozen features stochastic: eval mode for good.
        self.backbone.requires_grad_(method == "finetune")
        self.banks: list[ExpertBank] = []
        if method == "hres":
            self.method_config = method_config or HResConfig()
            self.banks = add_hres_experts(self.backbone, self.method_config)
        elif method == "lora":
            self.method_config = method_config or LoRAConfig()
            self.banks = add_lora_experts(self.backbone, self.method_config)
        elif method == "vpt":
            self.method_config = method_config or VPTConfig()
            add_vpt_prompts(self.backbone, self.method_config)
        else:
            self.method_config = None
        self.num_features = self.backbone.num_features
        self.train_head = nn.Linear(self.num_features, num_classes)
        # One statistics head per task label: a class-incremental stream has only task 0;
        # in a task-incremental stream each task's head sees only its own data, so it
        # never changes after its task (its features do not move under NSP).
        self._head_args = {"ridge": ridge, "projection": ridge_projection}
        self.stats_heads = nn.ModuleDict()
        self.task_classes: dict[int, list[int]] = {}
        self.current_classes: list[int] = []
        self.current_tasks: list[int] = []
        self.experiences_seen = 0
        self.train()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.train_head.weight.device

    def train(self, mode: bool = True) -> ContinualViT:
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
        if self.banks and (self.expert_per_experience or self.banks[0].num_experts == 0):
            for bank in self.banks:
                bank.add_expert(device=self.device)
        self.experiences_seen += 1

    @property
    def has_statistics_pass(self) -> bool:
        """Whether :meth:`end_experience` runs a forward pass over the experience's data."""
        return self.head_kind != "linear"

    @torch.no_grad()
    def end_experience(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Adds an experience's training features ``(x, y, task)`` to the statistics heads."""
        if not self.has_statistics_pass:
            return
        was_training = self.training
        self.eval()
        heads = {t: self.stats_head(t) for t in self.current_tasks}
        before = {}
        for t, head in heads.items():
            # Same class count on every rank, so the buffers can be all-reduced.
            head._grow(self.train_head.out_features)
            before[t] = {k: v.clone() for k, v in head.statistics().items()}
        for x, y, task in batches:
            f = self.features(x.to(self.device)).float()
            y, task = y.to(self.device), task.to(self.device)
            for t, head in heads.items():
                rows = task == t
                head.update(f[rows], y[rows])
        for t, head in heads.items():
            for k, v in head.statistics().items():
                distributed.all_reduce_increment_(v, before[t][k])
            head.fit()
        self.train(was_training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimizer should receive now."""
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_parameter_count(self) -> int:
        """Parameters the method trains now, excluding the classifier head."""
        head = {id(p) for p in self.train_head.parameters()}
        return sum(p.numel() for p in self.trainable_parameters() if id(p) not in head)

    def adapter_parameter_count_total(self) -> int:
        """Parameters the method added or trained over the stream (frozen experts included)."""
        if self.method == "finetune":
            return sum(p.numel() for p in self.backbone.parameters())
        head = {id(p) for p in self.train_head.parameters()}
        base = {
            id(p)
            for n, p in self.backbone.named_parameters()
            if ".bank." not in f".{n}" and "prompts" not in n
        }
        return sum(p.numel() for p in self.parameters() if id(p) not in head and id(p) not in base)

    # ---------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of the (adapted) backbone, ``(B, num_features)``."""
        tokens = self.backbone.forward_features(x)
        return self.backbone.forward_head(tokens, pre_logits=True)

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
            logits = self.train_head(f)
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
