"""hres-routed: one expert and one head per experience, a router picks the experience."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import TINY, make_vit

from cl_hres.cli import main
from cl_hres.errors import ConfigError
from cl_hres.nn.routing import RoutedExpertsViT

EXPERIENCES = ([0, 1], [2, 3], [4, 5])


def _stream(seed: int = 0):
    """Three experiences of 30 random images; expert t's up-projection set non-zero."""
    gen = torch.Generator().manual_seed(seed)
    model = RoutedExpertsViT(make_vit(), concat_pretrained=True, ridge_projection=64, num_classes=6)
    x = torch.rand(30, 1, 8, 8, generator=gen)
    snapshots = []
    for t, classes in enumerate(EXPERIENCES):
        model.begin_experience([(classes, [0])])
        with torch.no_grad():
            for bank in model.banks:  # as after training: expert t moves the features
                bank.up[f"expert{t}"].weight.normal_(generator=gen)
        y = torch.tensor(classes * 15)
        model.end_experience([(x, y, torch.zeros(30, dtype=torch.long))])
        model.eval()
        with torch.no_grad():
            f = model.features(x)
            snapshots.append({v: model.stats_heads[str(v)](model._view_pair(f, v)) for v in (1,)})
        model.train()
    return model.eval(), x, snapshots


def test_old_experience_heads_and_views_never_move():
    """Experience 0's head reads [pretrained, expert 0]: later experts leave its logits
    bit for bit where they were (exemplar-free: nothing of it is refitted)."""
    model, x, snapshots = _stream()
    assert sorted(model.stats_heads) == ["0", "1", "2", "3"]
    for later in snapshots[1:]:
        torch.testing.assert_close(later[1], snapshots[0][1], rtol=0, atol=0)
    owner = model.class_experience_view(6)
    assert owner.tolist() == [1, 1, 2, 2, 3, 3]


def test_prediction_is_the_routed_experiences_own_head():
    """The argmax lies among the classes of the experience with the best routing score
    (router's best class + w x the experience head's best class), and within it follows
    that experience's head, not the router's ranking."""
    model, x, _ = _stream()
    with torch.no_grad():
        f = model.features(x)
        router = model.stats_heads["0"](model._view_pair(f, 1))
        locals_ = {}
        for v in (1, 2, 3):
            scores = model.stats_heads[str(v)](model._view_pair(f, v))
            locals_[v] = torch.nn.functional.pad(scores, (0, 6 - scores.shape[1]), value=-1e9)
    owner = model.class_experience_view(6)
    own = torch.stack([locals_[int(owner[c])][:, c] for c in range(6)], dim=1)
    for weight in (0.0, 0.3, 5.0):
        model.routing_weight = weight
        with torch.no_grad():
            logits = model(x)
        assert torch.isfinite(logits).all()  # the evaluation loss stays finite
        score = torch.stack(
            [
                router[:, owner == v].amax(1) + weight * own[:, owner == v].amax(1)
                for v in (1, 2, 3)
            ],
            dim=1,
        )
        chosen = score.argmax(1) + 1
        pred = logits.argmax(1)
        assert (owner[pred] == chosen).all()
        expected = own.masked_fill(owner.unsqueeze(0) != chosen.unsqueeze(1), float("-inf"))
        assert (pred == expected.argmax(1)).all()
    # Not vacuous: the router alone and the routed prediction disagree on some images.
    assert (router.argmax(1) != pred).any()


def test_task_label_routes_a_task_incremental_stream():
    model, x, _ = _stream()
    model.task_classes = {t: list(c) for t, c in enumerate(EXPERIENCES)}
    with torch.no_grad():
        logits = model(x, torch.full((30,), 2))
    assert set(logits.argmax(1).tolist()) <= {4, 5}


def test_routed_needs_a_statistics_head():
    with pytest.raises(ConfigError, match="needs --head ridge or ncm"):
        RoutedExpertsViT(make_vit(), head="linear", concat_pretrained=True)


def test_routed_strategy_runs_and_resumes(tmp_path, monkeypatch):
    """Interrupted in experience 2 and resumed from experience 1's checkpoint (the router
    and the experience heads rebuilt from it), the run ends as an uninterrupted one."""
    from _helpers import interrupt_on_second_call

    from cl_hres.avalanche import ContinualViTPlugin
    from cl_hres.run.config import RunConfig

    cfg = RunConfig(strategy="hres-routed")
    cfg.resolve_strategy_defaults()
    assert (cfg.head, cfg.ridge_projection, cfg.head_reads_pretrained()) == ("ridge", 2000, True)
    # A narrower projection than the default keeps the test's Gram matrices small.
    args = [*TINY, "--strategy", "hres-routed", "--experiences", "2", "--ridge-projection", "128"]
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    assert main(["run", "--out", str(ref), *args]) == 0
    res = json.loads((ref / "results.json").read_text())
    assert len(res["accuracy_matrix"]) == 2 and res["final_average_accuracy"] > 0.5
    original = interrupt_on_second_call(
        monkeypatch, ContinualViTPlugin, "after_train_dataset_adaptation"
    )
    assert main(["run", "--out", str(out), *args]) == 130
    monkeypatch.setattr(ContinualViTPlugin, "after_train_dataset_adaptation", original)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["accuracy_matrix"] == res["accuracy_matrix"]
