"""Shared helpers for the tests (tests/ is on sys.path under pytest's prepend mode)."""

from pathlib import Path

import torch

# Options of the shared tiny runs (conftest's tiny_run, tiny_task_run); a test comparing
# against one of them runs with these too. Every experience trains: with the default
# admission threshold, experiences after the first one of split-digits would train
# nothing (every bank closed or dormant) and run no SGD step.
TINY = [
    "--epochs",
    "1",
    "--no-progress",
    "--no-fwt-reference",
    "--experiences",
    "3",
    "--nsp-min-free-energy",
    "0",
]


def make_vit(seed: int = 0, **overrides):
    """A small random-init timm ViT (8×8 single-channel input, 4 patches + cls)."""
    from cl_hres.nn.backbones import create_backbone

    kwargs = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return create_backbone("vit_tiny_patch16_224", **kwargs)


def key_loss_steps(model, x, steps: int = 3) -> list[float]:
    """The key-matching loss of ``steps`` SGD steps on the model's prompt keys alone."""
    opt = torch.optim.SGD([model.pool.keys], lr=0.5)
    losses = []
    for _ in range(steps):
        model.backbone_features(x)
        loss = model.auxiliary_loss()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def interrupt_on_second_call(monkeypatch, cls, name: str):
    """Patches ``cls.name`` to raise KeyboardInterrupt on its second call; returns the original."""
    original = getattr(cls, name)
    calls = {"n": 0}

    def interrupt(self, strategy, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, strategy, **kw)

    monkeypatch.setattr(cls, name, interrupt)
    return original


def tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series ``tag -> [(step, value)]`` of an event directory or file.

    A directory is read as TensorBoard reads it: all its event files, purges applied.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
