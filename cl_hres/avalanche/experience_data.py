"""The data of the experience a strategy is training, as the plugins read it.

Helpers shared by the plugins of :mod:`cl_hres.avalanche`: which experiences a ``train``
call covers, a key for "this experience", and passes over its data with evaluation
transforms (the statistics pass, the probe images), made in eval mode (:func:`evaluating`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from cl_hres import distributed

__all__ = [
    "eval_batches",
    "experience_key",
    "experiences_in_training",
    "model_features",
    "probe_batch",
    "stratified_indices",
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
    from cl_hres.data.loaders import WorkerSafeDataset, one_pass_kwargs

    dataset = distributed.shard(strategy.adapted_dataset.eval())
    # Workers and pinned memory as the training loader had them: on a GPU this pass
    # reads as many images as an epoch.
    loader = DataLoader(
        WorkerSafeDataset(dataset),
        batch_size=strategy.eval_mb_size,
        shuffle=False,
        **one_pass_kwargs(getattr(strategy, "dataloader", None)),
    )
    device = strategy.device
    for batch in loader:
        x, y = batch[0], batch[1]
        # Datasets without task labels (class-incremental streams) are task 0.
        t = batch[2] if len(batch) >= 3 else torch.zeros_like(y)
        yield (
            x.to(device, non_blocking=True),
            y.to(device, non_blocking=True),
            t.to(device, non_blocking=True),
        )


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
