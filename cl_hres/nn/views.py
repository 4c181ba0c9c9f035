"""Per-experience expert views with exemplar-free prototype complement (EASE's idea).

Each experience trains its own H-Res expert on top of the frozen pretrained backbone,
alone (earlier experts switched off), so expert ``t`` is a feature space of its own:
view ``t + 1`` is the backbone with expert ``t`` only, view 0 the pretrained backbone.
The head is a prototype classifier over every view: the score of class ``c`` is the mean
over views of ``cos(f_v(x), p_v(c))``.

A class's prototype in a view made after its experience cannot be measured without its
images. It is synthesised from the prototypes of the view's own classes, weighted by how
similar the old class is to each of them in the pretrained view (a softmax of cosines,
temperature :data:`TEMPERATURE`): EASE's semantic-guided prototype complement. Nothing
else of old data is kept; prototypes of later classes in earlier views are exact, since
an expert never changes after its experience.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cl_hres.errors import ConfigError
from cl_hres.nn.heads import NCMHead
from cl_hres.nn.model import ContinualViT

__all__ = ["TEMPERATURE", "ExpertViewSwitch", "ExpertViewsViT"]

# Softmax temperature of the complement's cosine weights; 0.1 as in EASE's code.
TEMPERATURE = 0.1
# False: an old class is scored on the views where its prototype was measured only.
COMPLEMENT = False


class ExpertViewSwitch:
    """Mixin for a :class:`ContinualViT` whose experts are read one at a time.

    View ``v`` is the backbone with expert ``v - 1`` alone (view 0: every expert off), so
    each expert is a feature space of its own and never moves once its experience ends.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.head_kind == "linear":
            # The evaluation features are every view side by side: only a statistics
            # head reads them.
            raise ConfigError(f"{type(self).__name__} needs --head ridge or ncm, not linear")

    @property
    def num_views(self) -> int:
        """Views the head reads: the pretrained one and one per expert."""
        return 1 + max((b.num_experts for b in self.banks), default=0)

    @contextmanager
    def view(self, v: int) -> Iterator[None]:
        """Within the block, the backbone is view ``v``: expert ``v - 1`` alone (0: none)."""
        states = [(b.enabled, b.only) for b in self.banks]
        for b in self.banks:
            b.only = f"expert{v - 1}" if v else None
            b.enabled = v > 0
        try:
            yield
        finally:
            for b, (enabled, only) in zip(self.banks, states):
                b.enabled, b.only = enabled, only


class ExpertViewsViT(ExpertViewSwitch, ContinualViT):
    """A :class:`ContinualViT` whose head reads one view per experience (see module doc).

    Its statistics heads are keyed by view (``"0"`` pretrained, ``"k"`` expert ``k-1``),
    each an :class:`~cl_hres.nn.heads.NCMHead` of class prototypes.
    """

    def stats_head(self, task: int) -> NCMHead:
        """The prototype head of view ``task`` (created on first use)."""
        key = str(task)
        if key not in self.stats_heads:
            self.stats_heads[key] = NCMHead(self.backbone.num_features).to(self.device)
        return self.stats_heads[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """In training, the current expert's view; else every view, normalised, side by side."""
        if self.training:
            with self.view(self.num_views - 1):
                return self.backbone_features(x)
        parts = []
        for v in range(self.num_views):
            with self.view(v):
                parts.append(nn.functional.normalize(self.backbone_features(x), dim=-1))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def end_experience(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Adds the experience's prototypes in every view, then completes the new view."""
        width = self.backbone.num_features
        f, y, _ = self.collect_features(batches)
        newest = self.num_views - 1
        old = [
            c for c in range(self.stats_head(0).num_classes) if self.stats_head(0).class_counts[c]
        ]
        self._add_to_heads(
            [
                (self.stats_head(v), f[:, v * width : (v + 1) * width], y)
                for v in range(self.num_views)
            ]
        )
        if newest > 0 and old and COMPLEMENT:
            self._complement(newest, old)

    def _complement(self, v: int, old: list[int]) -> None:
        """Synthesised prototypes of the ``old`` classes in view ``v`` (no old images)."""
        pre, head = self.stats_head(0), self.stats_head(v)
        new = [c for c in self.current_classes if c < head.num_classes]
        means0 = pre.class_sums / pre.class_counts.clamp_min(1).unsqueeze(1)
        sim = (
            nn.functional.normalize(means0[old], dim=1)
            @ nn.functional.normalize(means0[new], dim=1).T
        )
        weights = torch.softmax(sim / TEMPERATURE, dim=1)
        means_v = head.class_sums[new] / head.class_counts[new].clamp_min(1).unsqueeze(1)
        head.class_sums[old] = weights @ means_v
        head.class_counts[old] = 1.0

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the linear head on the current view; else the mean cosine over views."""
        if self.training or not self.stats_heads:
            return super().forward(x, task_labels)
        f = self.features(x).float()
        width = self.backbone.num_features
        n = self.stats_head(0).num_classes
        logits = f.new_zeros(f.shape[0], max(n, self.train_head.out_features))
        views = torch.zeros(n, device=f.device)
        for v in range(self.num_views):
            head = self.stats_head(v)
            measured = (head.class_counts[:n] > 0).to(f.dtype)
            scores = head(f[:, v * width : (v + 1) * width])[:, :n]
            logits[:, :n] += torch.where(measured.bool(), scores, torch.zeros_like(scores))
            views += measured
        logits[:, :n] = logits[:, :n] / views.clamp_min(1)
        logits[:, n:] = float("-inf")
        logits[:, :n] = logits[:, :n].masked_fill(views == 0, float("-inf"))
        mask = self._class_mask(task_labels, logits.shape[0], logits.shape[1])
        return logits.masked_fill(~mask, float("-inf"))
