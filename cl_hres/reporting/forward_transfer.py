"""Forward transfer that exists for every head and scenario (Continual World / intransigence).

``FWT_j = acc_j(stream) − acc_j(reference)``: the accuracy on experience j's test data, with
logits restricted to j's classes, right after the stream has learned j, minus the same
accuracy of a *reference* that learned experience j alone, from the same pretrained
backbone, with the same method and hyper-parameters (Wołczyk et al. 2021; Chaudhry et
al. 2018 call its negative intransigence). Negative values measure lost plasticity: what
protecting earlier experiences costs the new one. The run reports every ``FWT_j`` and their
mean over ``j >= 1`` (experience 0 has nothing before it).

References are cached by what determines them (backbone, method family, method and
training hyper-parameters, seed, the experience's classes), so ``hres`` and ``hres-nsp``
share theirs (with nothing learned before, NSP has nothing to protect), as do ``lora``
and ``lora-nsp``, and reruns cost nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cl_hres.nn.base import evaluating

__all__ = ["ReferenceCache", "forward_transfer_summary", "reference_key", "within_accuracy"]

# Fields of a run's config that do not change what a one-experience reference learns.
_NOT_IN_KEY = (
    "strategy",
    "nsp_rule",
    "nsp_threshold",
    "nsp_eta",
    "nsp_separate_prefix",
    "nsp_precision",
    "device",
    "data_root",
    "eval_batch_size",
    "experiences",
    "fwt_reference",
    "num_workers",  # how batches are loaded, not what they hold
)


def method_family(strategy: str) -> str:
    """The strategy a reference trains with (the registry's ``reference``).

    NSP variants learn a first experience alone exactly as their unprotected twins do.
    """
    from cl_hres import registry

    return registry.STRATEGIES[strategy].reference_strategy


def reference_key(config: dict[str, Any], weights_id: str, classes: Sequence[int]) -> str:
    """A stable key of the reference for one experience.

    ``config`` is a prepared run's (``cl_hres.run.prepare`` resolves ``concat_pretrained``).
    """
    fields = {k: v for k, v in config.items() if k not in _NOT_IN_KEY}
    fields["method"] = method_family(config["strategy"])
    fields["weights"] = weights_id
    fields["classes"] = sorted(int(c) for c in classes)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class ReferenceCache:
    """Reference accuracies in one JSON file, written atomically after each new entry.

    Args:
        path: The JSON file (read once, here).
        write: Whether this process writes it (rank 0 of a distributed run).
    """

    def __init__(self, path: Path, *, write: bool = True) -> None:
        self.path = path
        self.write = write
        try:
            self.values: dict[str, float] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.values = {}

    def get(self, key: str) -> float | None:
        """The cached reference accuracy under ``key``, or None."""
        return self.values.get(key)

    def put(self, key: str, value: float) -> None:
        """Stores a reference accuracy and writes the cache file."""
        from cl_hres.fileio import atomic_write_text

        self.values[key] = value
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.values, indent=1, sort_keys=True))


@torch.no_grad()
def within_accuracy(
    model: torch.nn.Module,
    experience: Any,
    classes: Sequence[int],
    *,
    device: torch.device | str,
    batch_size: int,
) -> float:
    """Accuracy on ``experience``'s data (eval transforms), logits restricted to ``classes``."""
    with evaluating(model):
        loader = DataLoader(experience.dataset.eval(), batch_size=batch_size, shuffle=False)
        allowed: torch.Tensor | None = None
        correct = total = 0
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            t = batch[2].to(device) if len(batch) >= 3 else torch.zeros_like(y)
            logits = model(x, t).float()
            if allowed is None:
                allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                allowed[[c for c in classes if c < logits.shape[1]]] = True
            pred = logits.masked_fill(~allowed, float("-inf")).argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def reference_accuracies(
    *,
    train_stream: Sequence[Any],
    test_stream: Sequence[Any],
    config: dict[str, Any],
    weights_id: str,
    cache: ReferenceCache,
    train_alone: Callable[[int], torch.nn.Module],
    device: torch.device | str,
    batch_size: int,
) -> list[float]:
    """The reference accuracy of every experience, from the cache or trained now.

    Args:
        train_stream: The stream's training experiences.
        test_stream: Its test experiences, in the same order.
        config: The run's config (as a dict), for the cache key.
        weights_id: Identifies the backbone's weights (e.g. their sha256).
        cache: Where references are looked up and stored.
        train_alone: Trains a fresh model on experience ``j`` alone and returns it.
        device: Where evaluation runs.
        batch_size: Evaluation batch size.
    """
    out = []
    for j, (train_exp, test_exp) in enumerate(zip(train_stream, test_stream)):
        classes = sorted(int(c) for c in train_exp.classes_in_this_experience)
        key = reference_key(config, weights_id, classes)
        value = cache.get(key)
        if value is None:
            model = train_alone(j)
            value = within_accuracy(model, test_exp, classes, device=device, batch_size=batch_size)
            cache.put(key, value)
        out.append(value)
    return out


def forward_transfer_summary(within: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Per-experience forward transfer and its mean over experiences ``j >= 1``."""
    per = [float(w - r) for w, r in zip(within, reference)]
    later = per[1:]
    return {
        "within_accuracy": [float(w) for w in within],
        "reference_accuracy": [float(r) for r in reference],
        "per_experience": per,
        "mean": float(sum(later) / len(later)) if later else None,
    }
