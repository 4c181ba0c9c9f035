"""Statistics heads and the analysis command."""

import json

import pytest
import torch

from cl_hres.avalanche import FeatureProbes
from cl_hres.cli.app import main
from cl_hres.commands.analyze import attention_statistics, collapse_ratio
from cl_hres.nn.heads import NCMHead, RidgeHead


def _blobs(n=60, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize(
    "head", [RidgeHead(6, ridge=1e-3), RidgeHead(6, ridge=1e-3, projection=64), NCMHead(6)]
)
def test_heads_separate_blobs_and_accumulate_in_chunks(head):
    x, y = _blobs()
    head.update(x[:30], y[:30])
    head.update(x[30:], y[30:])
    head.fit()
    assert (head(x).argmax(1) == y).float().mean() > 0.95
    one = (
        type(head)(6)
        if isinstance(head, NCMHead)
        else RidgeHead(
            6, ridge=1e-3, projection=head.num_features if head.projection is not None else 0
        )
    )
    one.update(x, y)
    one.fit()
    torch.testing.assert_close(one(x), head(x), rtol=1e-4, atol=1e-4)


def test_ridge_matches_closed_form_with_intercept():
    x, y = _blobs(d=4)
    head = RidgeHead(4, ridge=0.5)
    head.update(x, y)
    head.fit()
    xd, yd = x.double(), torch.nn.functional.one_hot(y).double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    lam = 0.5 * torch.trace(xc.T @ xc) / 4
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(4, dtype=torch.float64), xc.T @ yc)
    b = yd.mean(0) - xd.mean(0) @ w
    torch.testing.assert_close(head(x).double(), xd @ w + b, rtol=1e-4, atol=1e-4)


def test_unseen_classes_score_minus_inf():
    x, y = _blobs()
    head = RidgeHead(6)
    head.update(x, y + 2)  # classes 0 and 1 never seen
    head.fit()
    assert torch.isinf(head(x)[:, :2]).all()


def test_collapse_ratio_orders_tight_and_loose_clusters():
    x, y = _blobs()
    tight = collapse_ratio(x, y)
    assert tight < collapse_ratio(x + 5 * torch.randn_like(x), y)


def test_attention_statistics_leave_the_model_in_its_mode():
    from _helpers import make_vit

    vit = make_vit().train()
    stats = attention_statistics(vit, torch.randn(3, 1, 8, 8))
    assert len(stats) == 2 and vit.training  # measured in eval mode, training mode restored


def test_attention_statistics_read_timms_own_attention_probabilities():
    """One qkv projection per block (timm's own forward, nothing recomputed); modes restored."""
    import math

    from _helpers import make_vit
    from timm.models.vision_transformer import Attention

    vit = make_vit()
    attns = [m for m in vit.modules() if isinstance(m, Attention)]
    attns[1].fused_attn = False  # a setting of the model's own: kept as it was
    before = [a.fused_attn for a in attns]
    calls = []
    for a in attns:
        a.qkv.register_forward_hook(lambda m, args, out: calls.append(m))
    stats = attention_statistics(vit, torch.randn(3, 1, 8, 8))
    assert calls == [a.qkv for a in attns]
    assert [a.fused_attn for a in attns] == before
    assert not any(a.attn_drop._forward_hooks for a in attns)
    for rec in stats:  # 4 patches + cls: entropies of 5-way distributions
        assert rec["sequence_length"] == 5 and 0 < rec["entropy"] <= math.log(5) + 1e-6


def test_checkpoint_module_exports_only_its_own_functions():
    """No names kept for old import paths (atomic_write_text is cl_hres.fileio's)."""
    from cl_hres.run import checkpoint

    assert not hasattr(checkpoint, "atomic_write_text")
    for name in checkpoint.__all__:
        assert getattr(checkpoint, name).__module__ == checkpoint.__name__, name


def test_analyze_reports_claims_on_a_tiny_run(tmp_path, capsys, tiny_run):
    import shutil

    from _helpers import TINY

    # analyze writes into the run: a copy of the shared one.
    shutil.copytree(tiny_run.out, tmp_path / "h")
    main(["run", "--out", str(tmp_path / "v"), "--strategy", "vpt", "--vpt-length", "3", *TINY])
    capsys.readouterr()
    assert (
        main(
            [
                "analyze",
                "--run",
                str(tmp_path / "h"),
                "--other-run",
                str(tmp_path / "v"),
                "--images",
                "32",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "h" / "analysis.json").read_text())
    att = report["attention"]
    assert set(att) == {"frozen", "hres-nsp", "vpt"}
    depth = len(att["frozen"])
    assert depth == 6 and all(len(att[k]) == depth for k in att)  # the shipped ViT
    # H-Res never adds tokens; VPT adds its prompts to every block's sequence.
    assert [r["sequence_length"] for r in att["hres-nsp"]] == [
        r["sequence_length"] for r in att["frozen"]
    ]
    assert all(
        v["sequence_length"] == f["sequence_length"] + 3 for v, f in zip(att["vpt"], att["frozen"])
    )
    # The first block sees the frozen model's input, so its attention is identical.
    assert att["hres-nsp"][0]["entropy"] == pytest.approx(att["frozen"][0]["entropy"], abs=1e-6)
    assert set(report["neural_collapse"]) == {"frozen", "hres-nsp", "vpt"}
    assert len(report["null_space"]) == 3
    assert "CLS attention entropy" in (tmp_path / "h" / "analysis.md").read_text()
    assert main(["analyze", "--run", str(tmp_path / "missing")]) == 2


def test_gcv_regularises_more_when_data_are_scarce():
    g = torch.Generator().manual_seed(0)
    many = RidgeHead(20)
    x, y = _blobs(n=2000, d=20)
    many.update(x, y)
    many.fit()
    few = RidgeHead(20)
    xs = torch.randn(30, 20, generator=g)  # pure noise features, n ≈ d
    few.update(xs, torch.arange(30) % 3)
    few.fit()
    assert many.chosen_ridge in RidgeHead.GRID and few.chosen_ridge in RidgeHead.GRID
    assert few.chosen_ridge > many.chosen_ridge


def test_empty_batches_are_ignored():
    head = RidgeHead(6)
    head.update(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    assert head.num_classes == 0 and head.gram.abs().sum() == 0


def test_feature_drift_is_measured_in_class_spreads():
    # Two classes at ±e1: class means ±e1 around centroid 0, so one spread is 1.
    probes = FeatureProbes()
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    probes.x, probes.y, probes.ref = [x], [torch.tensor([0, 1, 0, 1])], [x.clone()]
    assert probes.drift(lambda v: v) == {0: {"relative": 0.0, "class_spreads": 0.0}}

    class Shift(torch.nn.Module):  # every feature moved by 0.5 along e2
        def forward(self, v):
            return v + torch.tensor([0.0, 0.5])

    d = probes.drift(Shift())[0]
    assert d["class_spreads"] == pytest.approx(0.5)
    assert d["relative"] == pytest.approx(0.5)
