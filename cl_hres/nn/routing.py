"""Per-experience experts behind a router, exemplar-free (``hres-routed``).

Experience ``t`` trains H-Res expert ``t`` alone on the frozen backbone (earlier experts
switched off, :class:`~cl_hres.nn.views.ExpertViewSwitch`), so each experience gets a
feature space adapted to its own domain that nothing later moves. Two kinds of ridge head
read them:

* an **experience head** per experience over ``[pretrained(x), expert_t(x)]``, fitted on
  that experience's images only: it never needs an old image and never changes after its
  experience;
* a **router** over ``[pretrained(x), expert_0(x)]`` with every class seen (the
  first-session view of APER/RanPAC: its features never move, so its statistics
  accumulate exactly, as in RanPAC).

At evaluation each experience ``v`` scores ``max_{c in v} router(c) + w * max_{c in v}
head_v(c)``: the router's confidence plus, weighted by :data:`ROUTING_WEIGHT`, how well the
experience's own expert and head recognise the image (MOS's idea of letting the experts
check the choice). The best-scoring experience's head then names the class. The logits keep every head's scores (finite, so the evaluation loss stays
finite) and lift the chosen experience's classes above all others, so their argmax is the
routed prediction. In a task-incremental stream the router is restricted to the task's
classes, so the task label chooses the experience.

Statistics heads are keyed ``"0"`` (router) and ``"k"`` (experience ``k - 1``'s head), so
checkpoints rebuild them as any other head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cl_hres.nn.model import ContinualViT
from cl_hres.nn.views import ExpertViewSwitch

__all__ = ["ROUTING_WEIGHT", "RoutedExpertsViT"]

# Weight of an experience head's own confidence in the routing score, chosen on
# split-domains validation data (docs/defaults.md#routing-weight, scripts/routing_weight.py).
ROUTING_WEIGHT = 0.3


class RoutedExpertsViT(ExpertViewSwitch, ContinualViT):
    """A :class:`ContinualViT` with one expert and one head per experience and a router.

    Built with ``concat_pretrained=True`` (every head reads the pretrained features beside
    an expert's); see the module doc for the protocol.
    """

    #: Weight of an experience head's confidence in the routing score (not saved: a
    #: setting of the evaluation rule, read by ``scripts/routing_weight.py``).
    routing_weight: float = ROUTING_WEIGHT

    def _views(self, x: torch.Tensor, views: Iterable[int]) -> list[torch.Tensor]:
        x = self._cast_input(x)
        out = []
        for v in views:
            with self.view(v), torch.set_grad_enabled(v > 0 and torch.is_grad_enabled()):
                out.append(self.backbone_features(x))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Training: ``[pretrained, newest expert]``; else ``[pretrained, view 1, …, view E]``."""
        if self.training:
            return torch.cat(self._views(x, (0, self.num_views - 1)), dim=-1)
        return torch.cat(self._views(x, range(self.num_views)), dim=-1)

    def _view_pair(self, f: torch.Tensor, v: int) -> torch.Tensor:
        """``[pretrained, view v]`` out of :meth:`features`' evaluation output."""
        w = self.backbone.num_features
        return torch.cat([f[:, :w], f[:, v * w : (v + 1) * w]], dim=-1)

    @torch.no_grad()
    def end_experience(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Adds the experience's images to the router and fits the experience's own head."""
        f, y, _ = self.collect_features(batches)
        newest = self.num_views - 1
        self._add_to_heads(
            [
                (self.stats_head(0), self._view_pair(f, 1), y),
                (self.stats_head(newest), self._view_pair(f, newest), y),
            ]
        )

    def class_experience_view(self, num_classes: int) -> torch.Tensor:
        """``(num_classes,)``: the view whose head holds each class (0: none yet)."""
        owner = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        for key, head in self.stats_heads.items():
            if key != "0":
                n = min(head.num_classes, num_classes)
                owner[:n][head.class_counts[:n] > 0] = int(key)
        return owner

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the linear head on the current view; else the routed logits."""
        if self.training or not self.stats_heads:
            return super().forward(x, task_labels)
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.routed_logits(self.features(x).float(), task_labels)

    def routed_logits(
        self, f: torch.Tensor, task_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The evaluation logits from :meth:`features` (see the module doc)."""
        n = self.train_head.out_features
        mask = self._class_mask(task_labels, f.shape[0], n)
        router = f.new_full((f.shape[0], n), float("-inf"))
        head = self.stats_heads["0"]
        router[:, : head.num_classes] = head(self._view_pair(f, 1))[:, :n]
        owner = self.class_experience_view(n)
        router = router.masked_fill(~mask, float("-inf"))
        logits = self.experience_logits(f, owner).masked_fill(~mask, float("-inf"))
        chosen = self.route(router, logits, owner)
        finite = torch.isfinite(logits)
        top = logits.masked_fill(~finite, float("-inf")).amax(1)
        bottom = logits.masked_fill(~finite, float("inf")).amin(1)
        lift = (top - bottom + 1).clamp_min(1).nan_to_num(1.0)
        picked = (owner.unsqueeze(0) == chosen.unsqueeze(1)) & finite
        return logits + picked * lift.unsqueeze(1)

    def experience_logits(self, f: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """``(B, C)``: every class scored by its own experience's head on its own view.

        Args:
            f: :meth:`features` in evaluation mode.
            owner: The view holding each class (:meth:`class_experience_view`).
        """
        logits = f.new_full((f.shape[0], owner.numel()), float("-inf"))
        for v in range(1, self.num_views):
            head = self.stats_heads[str(v)] if str(v) in self.stats_heads else None
            if head is None or not head.num_classes:
                continue
            scores = head(self._view_pair(f, v))[:, : owner.numel()]
            mine = owner[: scores.shape[1]] == v
            logits[:, : scores.shape[1]][:, mine] = scores[:, mine]
        return logits

    def route(self, router: torch.Tensor, heads: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The view (experience + 1) each image goes to, ``(B,)``.

        Args:
            router: The router's logits ``(B, C)`` (classes outside the task ``-inf``).
            heads: Every class's score from its own experience's head ``(B, C)``.
            owner: The view holding each class ``(C,)`` (:meth:`class_experience_view`).
        """
        views = torch.arange(1, self.num_views, device=owner.device)
        member = owner.unsqueeze(0) == views.unsqueeze(1)  # (V, C)

        def best(scores: torch.Tensor) -> torch.Tensor:  # (B, V): best class of each view
            return scores.unsqueeze(1).masked_fill(~member, float("-inf")).amax(2)

        confidence = best(router) + self.routing_weight * best(heads).nan_to_num(neginf=-1e30)
        return views[confidence.argmax(1)]
