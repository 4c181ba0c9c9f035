"""The routing rule of ``hres-routed`` over a grid of weights, on a finished run's data.

Loads the final model of an ``hres-routed`` run (``results.json`` + checkpoint), computes
its evaluation-split features once (the split the run was evaluated on: pass a run made
with ``--validation`` to choose a weight without the test split), and prints, for each
weight ``w`` of the routing score ``max router + w * max experience head``: the final
average accuracy (mean over experiences, as results.json), the share of images routed to
their own experience, and, for reference, the accuracy with the true experience given
(oracle routing).

Usage: python scripts/routing_weight.py RUN_DIR [--weights 0,0.1,0.2,0.3,0.5,0.75]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cl_hres.commands.analyze import load_trained_model
from cl_hres.errors import ClHresError


def evaluation_features(model, prep, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every evaluation image's :meth:`features` and label, in dataset order."""
    transform = prep.transforms[1]
    feats, labels, images = [], [], []
    with torch.no_grad():
        for i in range(len(prep.data.test)):
            image, label = prep.data.test[i][:2]
            images.append(transform(image))
            labels.append(int(label))
            if len(images) == batch or i == len(prep.data.test) - 1:
                feats.append(model.features(torch.stack(images)).float())
                images = []
    return torch.cat(feats), torch.tensor(labels)


def per_experience_mean(correct: torch.Tensor, views: torch.Tensor) -> float:
    """Mean over experiences of each experience's accuracy (final average accuracy)."""
    return float(torch.stack([correct[views == v].float().mean() for v in views.unique()]).mean())


def main(argv: list[str] | None = None) -> int:
    """Prints the grid as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished hres-routed run directory")
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.75,1")
    args = parser.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",")]
        model, prep, results = load_trained_model(args.run)
    except (ValueError, ClHresError) as err:
        print(f"routing_weight.py: {err}", file=sys.stderr)
        return 2
    if not hasattr(model, "route"):
        print(f"routing_weight.py: {args.run} is a {results['strategy']} run", file=sys.stderr)
        return 2
    f, y = evaluation_features(model, prep)
    n = model.train_head.out_features
    owner = model.class_experience_view(n)
    own = owner[y]
    logits = model.experience_logits(f, owner)
    oracle = logits.masked_fill(owner.unsqueeze(0) != own.unsqueeze(1), float("-inf"))
    print(f"{args.run}: {results['evaluation_split']} split, {len(y)} images\n")
    print("| weight | final avg acc (%) | routed to own experience (%) |")
    print("|---|---|---|")
    for w in weights:
        model.routing_weight = w
        pred = model.routed_logits(f).argmax(1)
        routed = (owner[pred] == own).float().mean()
        print(f"| {w:g} | {100 * per_experience_mean(pred == y, own):.2f} | {100 * routed:.2f} |")
    print(f"| oracle | {100 * per_experience_mean(oracle.argmax(1) == y, own):.2f} | 100.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
