"""``cl-hres analyze``: measure the paper's claims on a trained run.

For a run directory (``results.json`` + last checkpoint) it reports:

* null-space dimension per adapted block after every experience, and the measured
  interference (relative change of old experiences' probe features), from the run;
* per block, the entropy of the cls token's attention distribution and the sequence
  length, for the frozen backbone, the trained model, and optionally a second run (e.g.
  VPT), on the same test images. The paper claims H-Res leaves both unchanged and VPT
  raises the entropy;
* a neural-collapse figure, ``tr(S_W) / tr(S_B)`` (within- over between-class scatter of
  the pre-logits features on the test data) before (frozen) and after adaptation.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from cl_hres.errors import CheckpointError
from cl_hres.fileio import atomic_write_text
from cl_hres.nn.base import evaluating
from cl_hres.nn.model import ContinualViT
from cl_hres.run.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    rebuild_structure,
)

__all__ = ["analyze_run", "attention_statistics", "collapse_ratio", "load_trained_model"]


@contextmanager
def _capture_attention(backbone: nn.Module, prefix_tokens: int):
    """Records per Attention module: mean entropy of the query-0 row, and sequence length.

    Reads timm's own attention probabilities instead of recomputing them: timm's unfused
    path applies ``attn_drop`` to the softmaxed ``q·kᵀ``, so a forward hook there sees
    them (as the hook's input, before any dropout). The fused kernel never forms them,
    so ``fused_attn`` is off within the block and restored on exit.
    """
    records: list[dict[str, float]] = []
    handles = []
    fused: list[tuple[Attention, bool]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        probs = args[0]  # (B, H, N, N), each row sums to 1
        # The cls token's query row when there is one, else the mean over query rows.
        rows = probs[:, :, 0] if prefix_tokens else probs.mean(dim=2)
        entropy = -(rows * rows.clamp_min(1e-30).log()).sum(-1)
        records.append({"entropy": float(entropy.mean()), "sequence_length": probs.shape[-1]})

    try:
        for m in backbone.modules():
            if isinstance(m, Attention):
                fused.append((m, m.fused_attn))
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(hook))
        yield records
    finally:
        for h in handles:
            h.remove()
        for m, was_fused in fused:
            m.fused_attn = was_fused


@torch.no_grad()
def attention_statistics(model: nn.Module, x: torch.Tensor) -> list[dict[str, float]]:
    """Per block: cls attention entropy (nats) and sequence length for images ``x``."""
    backbone = model.backbone if isinstance(model, ContinualViT) else model
    with evaluating(backbone), _capture_attention(backbone, backbone.num_prefix_tokens) as records:
        backbone.forward_features(x)
    return list(records)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, ContinualViT):
        return model.features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def collapse_ratio(features: torch.Tensor, labels: torch.Tensor) -> float:
    """``tr(S_W) / tr(S_B)``: smaller means tighter, better separated classes (NC1)."""
    f = features.double()
    mean = f.mean(0)
    within, between = 0.0, 0.0
    for c in labels.unique():
        fc = f[labels == c]
        mc = fc.mean(0)
        within += float(((fc - mc) ** 2).sum())
        between += float(len(fc) * ((mc - mean) ** 2).sum())
    return within / max(between, 1e-30)


def load_trained_model(run_dir: Path) -> tuple[ContinualViT, Any, dict[str, Any]]:
    """Rebuilds a run's final model from its checkpoint; returns (model, prepared, results)."""
    from cl_hres.avalanche.strategies import STRATEGIES
    from cl_hres.run.config import RunConfig
    from cl_hres.run.prepare import prepare

    results_path = run_dir / "results.json"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if not results_path.is_file() or ckpt is None:
        raise CheckpointError(
            f"{run_dir}: not a finished cl-hres run (results.json and checkpoints/)"
        )
    results = json.loads(results_path.read_text())
    config = RunConfig.from_dict(results["config"], source=str(results_path))
    config.device = "cpu"
    prep = prepare(config)
    state, tensors, _ = load_checkpoint(ckpt, results["config"])
    cls = STRATEGIES[config.strategy]
    # prepare() rebuilt the seeded backbone; an unwrapped copy is the "before" model.
    frozen = copy.deepcopy(prep.backbone).eval()
    model = cls.build_model(
        prep.backbone,
        method_config=config.method_config(),
        concat_pretrained=config.concat_pretrained,
        head=config.head,
        ridge=config.ridge_value(),
        ridge_projection=config.ridge_projection,
        balanced_head=config.balanced_head,
        num_classes=prep.data.num_classes,
    )
    rebuild_structure(model, state["structure"])
    load_model_state(model, tensors)
    model.eval()
    prep.backbone = frozen
    return model, prep, results


def _test_batch(prep, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` test images and labels, in dataset order, eval-transformed.

    The images are what the model sees in evaluation (the backbone's eval transform).
    """

    class _Eval(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(prep.data.test)

        def __getitem__(self, i: int):
            image, label = prep.data.test[i][:2]
            return prep.transforms[1](image), label

    loader = torch.utils.data.DataLoader(_Eval(), batch_size=limit, shuffle=False)
    batch = next(iter(loader))
    return batch[0], torch.as_tensor(batch[1])


def analyze_run(
    run_dir: Path, *, other_run: Path | None = None, images: int = 256
) -> dict[str, Any]:
    """Computes every figure above and writes ``analysis.json`` / ``analysis.md`` into ``run_dir``."""
    model, prep, results = load_trained_model(run_dir)
    x, y = _test_batch(prep, images)
    frozen = prep.backbone
    report: dict[str, Any] = {
        "run": str(run_dir),
        "strategy": results["strategy"],
        "images": int(x.shape[0]),
        "null_space": results.get("null_space"),
        "attention": {
            "frozen": attention_statistics(frozen, x),
            results["strategy"]: attention_statistics(model, x),
        },
        "neural_collapse": {
            "frozen": collapse_ratio(_features(frozen, x), y),
            results["strategy"]: collapse_ratio(_features(model, x), y),
        },
    }
    if other_run is not None:
        other, _, other_results = load_trained_model(other_run)
        if other_results["config"]["benchmark"] != results["config"]["benchmark"]:
            raise CheckpointError(f"{other_run}: a run on another benchmark cannot be compared")
        name = other_results["strategy"]
        report["attention"][name] = attention_statistics(other, x)
        report["neural_collapse"][name] = collapse_ratio(_features(other, x), y)
    atomic_write_text(run_dir / "analysis.json", json.dumps(report, indent=1))
    atomic_write_text(run_dir / "analysis.md", analysis_markdown(report))
    return report


def analysis_markdown(report: dict[str, Any]) -> str:
    """A short human-readable report."""
    lines = [
        f"# Analysis of {report['run']} ({report['strategy']}, {report['images']} test images)",
        "",
    ]
    lines += ["## CLS attention entropy (nats) and sequence length per block", ""]
    names = list(report["attention"])
    lines.append("| block | " + " | ".join(f"{n} entropy | {n} tokens" for n in names) + " |")
    lines.append("|---" * (1 + 2 * len(names)) + "|")
    for b in range(len(report["attention"][names[0]])):
        cells = []
        for n in names:
            rec = report["attention"][n][b]
            cells += [f"{rec['entropy']:.4f}", str(rec["sequence_length"])]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Neural collapse tr(S_W)/tr(S_B) on test features (lower = more collapsed)",
        "",
    ]
    for n, v in report["neural_collapse"].items():
        lines.append(f"- {n}: {v:.4f}")
    if report["null_space"]:
        lines += ["", "## Null space and measured interference per experience", ""]
        lines.append(
            "| after exp | null-space dim per block (of input dim) "
            "| share of the new / old inputs' energy free to learn from, per block "
            "| experts per block (* dormant) | max interference on old exps |"
        )
        lines.append("|---|---|---|---|---|")
        for h in report["null_space"]:
            worst = max(h["interference"].values(), default=0.0)
            dims = ", ".join(f"{d}/{i}" for d, i in zip(h["null_space_dims"], h["input_dims"]))
            new, old = h.get("free_energy") or [], h.get("old_free_energy") or []
            free = (
                ", ".join("–" if n is None else f"{n:.1e} / {o:.1e}" for n, o in zip(new, old))
                or "–"
            )
            dormant = set(h.get("dormant") or [])
            experts = ", ".join(
                f"{n}{'*' if b in dormant else ''}" for b, n in enumerate(h.get("experts") or [])
            )
            lines.append(
                f"| {h['experience'] + 1} | {dims} | {free} | {experts or '–'} | {worst:.2e} |"
            )
    return "\n".join(lines) + "\n"
