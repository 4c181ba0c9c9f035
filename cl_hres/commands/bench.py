"""``cl-hres bench``: throughput, memory and NSP costs of every method on one backbone.

All figures come from one process on one device, so their ratios are meaningful:

* training images/s of one optimizer step (forward, backward, AdamW step, and for
  ``hres-nsp`` the gradient and weight projections) for each method, and the **floor**:
  the frozen backbone with gradients flowing through every block to the input (what any
  method that adapts block 0 must pay) plus a linear head;
* inference images/s of the frozen backbone and of H-Res with 1, 5, 10 and 20 experts;
* NSP costs: the covariance-accumulation pass vs a plain eval forward pass over the same
  batches, eigendecomposition seconds per block, and the projection time per step;
* peak CUDA memory per method (on CPU: not measured, reported as null);
* input pipelines with the run's default loader settings (:mod:`cl_hres.data.loaders`), as
  images/s and as a ratio to the H-Res-NSP training rate at the same batch (``≥ 3``: the
  loader is never the bottleneck): ``in_memory`` (CIFAR-like 32 px float tensors,
  random resized crop + flip to the input size per image, as augmented ``.npz`` runs
  load them), ``in_memory_pil`` (the same images as PIL, per image, as
  ``split-cifar100`` runs load them) and ``file`` (an ImageFolder of JPEGs, decoded per
  image);
* inference with 1 to 50 experts, and with 10 experts at half the rank.

LoRA's rank is chosen so that its trainable parameters match H-Res's (equal budget).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_hres.commands.bench_data import data_figures
from cl_hres.nn.config import (
    HResConfig,
    LoRAConfig,
    VPTConfig,
)
from cl_hres.nn.model import ContinualViT
from cl_hres.nsp.config import NullSpaceConfig
from cl_hres.nsp.guard import NullSpaceGuard, PlasticityWarning

__all__ = ["BENCH_CONFIGS", "EXPERT_COUNTS", "BenchConfig", "run_bench"]

# Inference is timed with this many experts (the cost curve).
EXPERT_COUNTS = (1, 5, 10, 20, 50)


@dataclass(frozen=True)
class BenchConfig:
    """Backbone size and batch of a benchmark configuration."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    batch_size: int
    rank: int = 32


BENCH_CONFIGS = {
    # ViT-S/16 at 224 px, r = 32: the configuration of the targets.
    "vit-s": BenchConfig(224, 16, 384, 12, 6, 64),
    # A seconds-long configuration for CI.
    "tiny": BenchConfig(32, 8, 64, 2, 2, 16, rank=8),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _backbone(cfg: BenchConfig, device: torch.device) -> nn.Module:
    from cl_hres.nn.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(
        "vit_small_patch16_224",
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
    ).to(device)


def _lora_rank_for_equal_budget(cfg: BenchConfig) -> int:
    # H-Res per block: 2·d·r. LoRA on attention per block: qkv r·(d+3d) + proj r·(d+d) = 6·d·r.
    return max(1, round(2 * cfg.rank / 6))


# Each timed method: the registered strategy whose model it is, and its method config
# (None: the method's defaults).
_TIMED: dict[str, tuple[str, Callable[[BenchConfig], Any] | None]] = {
    "linear": ("linear", None),
    "floor": ("linear", None),
    "hres": ("hres", lambda cfg: HResConfig(rank=cfg.rank)),
    "hres-nsp": ("hres-nsp", lambda cfg: HResConfig(rank=cfg.rank)),
    "lora": (
        "lora",
        lambda cfg: LoRAConfig(
            rank=_lora_rank_for_equal_budget(cfg), alpha=2.0 * _lora_rank_for_equal_budget(cfg)
        ),
    ),
    "vpt-deep-10": ("vpt", lambda cfg: VPTConfig(length=10, deep=True)),
    "l2p": ("l2p", None),
    "dualprompt": ("dualprompt", None),
    "coda-prompt": ("coda-prompt", None),
}


def _method_model(
    name: str, cfg: BenchConfig, device: torch.device, num_classes: int
) -> ContinualViT:
    """The model of ``name`` as its strategy builds it, adapted features only."""
    from cl_hres.avalanche.strategies import strategy_class

    strategy, make_config = _TIMED[name]
    model = strategy_class(strategy).build_model(
        _backbone(cfg, device),
        method_config=make_config(cfg) if make_config else None,
        concat_pretrained=False,
        num_classes=num_classes,
    )
    model.to(device)
    model.begin_experience([(list(range(num_classes)), [0])])
    return model.to(device)


@dataclasses.dataclass
class _Bench:
    """What every measurement of one bench run shares."""

    cfg: Any
    dev: torch.device
    x: torch.Tensor
    y: torch.Tensor
    amp: Any
    warmup: int
    iters: int
    num_classes: int = 10

    def time(self, fn: Callable[[], Any], warmup: int | None = None, iters: int | None = None):
        return _time(fn, self.dev, self.warmup if warmup is None else warmup, iters or self.iters)


def run_bench(
    config: str = "tiny",
    *,
    device: str = "cpu",
    iters: int = 5,
    warmup: int = 2,
    autocast: bool = False,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Measures everything listed in the module docstring; returns a JSON-able dict."""
    cfg = BENCH_CONFIGS[config]
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g).to(dev)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=g).to(dev)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast)
    bench = _Bench(cfg, dev, x, y, amp, warmup, iters)
    results: dict[str, Any] = {
        "config": config,
        "shape": cfg.__dict__,
        "device": device,
        "autocast_bf16": autocast,
    }
    if dev.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(dev)
    else:
        import platform

        results["device_name"] = (
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    results["train"] = _train_figures(bench)
    results["inference"] = _inference_figures(bench)
    results["data"] = data_figures(
        img_size=cfg.img_size,
        batch_size=cfg.batch_size,
        device=dev,
        train_images_per_s=results["train"]["hres-nsp"]["images_per_s"],
        batches=max(4, iters),
    )
    results["nsp"] = _nsp_figures(bench)
    return results


def _second_experience_under_nsp(model: ContinualViT, b: _Bench) -> NullSpaceGuard:
    """Collects one image's statistics, then starts a second expert, projected by the guard."""
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    with torch.no_grad():
        model.eval()
        # One image's tokens (fewer than the width) leave every bank a null space; the
        # whole batch would span it, and a bank without one takes no expert.
        guard.collect(model.features, [b.x[:1]])
        model.train()
    model.begin_experience([(list(range(b.num_classes)), [0])])  # a second expert to train
    return guard


def _train_figures(b: _Bench) -> dict[str, dict[str, Any]]:
    """One training step per method, against the floor (forward + backward to the input)."""
    cfg, dev, num_classes = b.cfg, b.dev, b.num_classes
    train = {}
    for name in _TIMED:
        model = _method_model(name, cfg, dev, num_classes)
        guard = _second_experience_under_nsp(model, b) if name == "hres-nsp" else None
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        inp = b.x.clone().requires_grad_(name == "floor")

        def step(model=model, opt=opt, guard=guard, inp=inp) -> None:
            opt.zero_grad(set_to_none=True)
            with b.amp:
                loss = nn.functional.cross_entropy(model(inp).float(), b.y)
            extra = model.auxiliary_loss()  # the prompt methods' own terms; None for most
            if extra is not None:
                loss = loss + extra.float()
            loss.backward()
            if guard is not None:
                guard.step(opt)
            else:
                opt.step()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = b.time(step)
        train[name] = {
            "images_per_s": cfg.batch_size / seconds,
            "step_ms": 1000 * seconds,
            "trainable_parameters": model.adapter_parameter_count(),
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20
            if dev.type == "cuda"
            else None,
        }
        if guard is not None:
            train[name]["projection_ms"] = 1000 * b.time(
                lambda guard=guard: (guard.project_grads(), guard.project_weights())
            )
        del model, opt
    floor = train["floor"]["step_ms"]
    for row in train.values():
        row["ratio_to_floor"] = row["step_ms"] / floor
    return train


def _inference_figures(b: _Bench) -> dict[str, dict[str, Any]]:
    """Inference with K experts (and K = 10 at half rank) against the frozen backbone."""
    cfg = b.cfg
    infer = {}
    frozen = _method_model("linear", cfg, b.dev, b.num_classes).eval()
    with torch.no_grad(), b.amp:
        base = b.time(lambda: frozen(b.x))
    infer["frozen"] = {"images_per_s": cfg.batch_size / base, "ratio_to_frozen": 1.0}
    for experts, rank in [(k, cfg.rank) for k in EXPERT_COUNTS] + [(10, cfg.rank // 2)]:
        model = _method_model("hres", dataclasses.replace(cfg, rank=rank), b.dev, b.num_classes)
        for _ in range(experts - 1):
            model.begin_experience([(list(range(b.num_classes)), [0])])
        for bank in model.banks:  # non-zero experts so nothing is skipped
            for up in bank.up.values():
                nn.init.normal_(up.weight, std=1e-3)
        model.eval()
        with torch.no_grad(), b.amp:
            t = b.time(lambda model=model: model(b.x))
        name = f"hres_{experts}_experts" + ("" if rank == cfg.rank else f"_rank{rank}")
        infer[name] = {"images_per_s": cfg.batch_size / t, "ratio_to_frozen": t / base}
    return infer


def _nsp_figures(b: _Bench) -> dict[str, float]:
    """Covariance accumulation against a plain forward pass; eigendecomposition per block.

    The accumulation is timed with float64 and with float32 products of ``XᵀX``. The two
    guards share the banks' statistics; each passes its own precision to every update
    (``NullSpaceGuard.recording``), so building the float32 guard second does not turn
    the float64 timing into a second float32 one.
    """
    model = _method_model("hres", b.cfg, b.dev, b.num_classes).eval()
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(precision="float64"))
    fp32_guard = NullSpaceGuard(model.banks, NullSpaceConfig(precision="float32"))
    with torch.no_grad():
        plain = b.time(lambda: model.features(b.x))

        def accumulate(g: NullSpaceGuard) -> None:
            with g.recording():
                model.features(b.x)

        acc = b.time(lambda: accumulate(guard))
        acc32 = b.time(lambda: accumulate(fp32_guard))
        with warnings.catch_warnings():
            # Random inputs span the banks: the closed-bank warning would describe no run.
            warnings.simplefilter("ignore", PlasticityWarning)
            eig = b.time(guard.refresh, 1, max(1, b.iters // 2)) / len(model.banks)
    return {
        "eval_forward_ms": 1000 * plain,
        "accumulate_forward_ms": 1000 * acc,
        "accumulate_ratio": acc / plain,
        "accumulate_fp32_forward_ms": 1000 * acc32,
        "accumulate_fp32_ratio": acc32 / plain,
        "eigendecomposition_ms_per_block": 1000 * eig,
    }


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``bench.md``."""
    lines = [
        f"Device: {results['device_name']}; config {results['config']} {results['shape']}; bf16 autocast {results['autocast_bf16']}",
        "",
    ]
    lines += [
        "| training | images/s | step ms | × floor | trainable params | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["train"].items():
        mem = "–" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {name} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['ratio_to_floor']:.2f} | {r['trainable_parameters']:,} | {mem} |"
        )
    lines += ["", "| inference | images/s | × frozen |", "|---|---|---|"]
    for name, r in results["inference"].items():
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['ratio_to_frozen']:.2f} |")
    lines += [
        "",
        "| input pipeline | workers | images/s | × hres-nsp training rate |",
        "|---|---|---|---|",
    ]
    for name, r in results["data"].items():
        lines.append(
            f"| {name} | {r['num_workers']} | {r['images_per_s']:.1f} | {r['ratio_to_train']:.1f} |"
        )
    n = results["nsp"]
    lines += [
        "",
        f"NSP: covariance accumulation {n['accumulate_ratio']:.2f}× an eval forward pass "
        f"(float32 products: {n['accumulate_fp32_ratio']:.2f}×); eigendecomposition "
        f"{n['eigendecomposition_ms_per_block']:.2f} ms per block; projection "
        f"{results['train']['hres-nsp']['projection_ms']:.2f} ms per step.",
    ]
    return "\n".join(lines) + "\n"


def write_bench(results: dict[str, Any], out: Path) -> None:
    """Writes ``bench.json`` and ``bench.md`` into ``out``."""
    from cl_hres.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(results, indent=1))
    atomic_write_text(out / "bench.md", markdown(results))
