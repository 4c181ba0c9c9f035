"""scripts/subspace_bound.py on synthetic features: the imputation and its one-line errors."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "subspace_bound.py"
_SPEC = importlib.util.spec_from_file_location("subspace_bound", _PATH)
sb = importlib.util.module_from_spec(_SPEC)
sys.modules["subspace_bound"] = sb  # dataclasses look their module up
_SPEC.loader.exec_module(sb)


def _affine_features(*, shared: bool, seed: int = 0) -> sb.Features:
    """3 experiences of 2 classes; every expert's features an affine map of the frozen ones.

    With ``shared`` the map of each expert is the same on every experience's images, so an
    imputation fitted on one experience is exact on the others.
    """
    gen = torch.Generator().manual_seed(0)
    d, t, per_class = 4, 3, 30
    maps = [torch.randn(d, d, generator=gen) for _ in range(t)]
    all_means = [3 * torch.randn(2, d, generator=gen) for _ in range(t)]
    gen.manual_seed(seed)  # the same classes, other images
    pre, labels = [], []
    for j in range(t):
        means = all_means[j]
        y = torch.arange(2 * j, 2 * j + 2).repeat_interleave(per_class)
        pre.append(means[y - 2 * j] + torch.randn(len(y), d, generator=gen))
        labels.append(y)
    sub = [
        [pre[j] @ (maps[k] if shared or j == k else maps[k] + 2 * torch.eye(d)).T for j in range(t)]
        for k in range(t)
    ]
    return sb.Features(pre, sub, labels)


def test_imputation_is_exact_when_the_map_is_shared_across_experiences():
    train = _affine_features(shared=True)
    for j in range(2):
        got = sb.imputed(train, j, 3, 1e-9)
        want = sb._known(train, j, 2)
        assert torch.allclose(got, want, atol=1e-3 * want.abs().max())
    errors = sb.imputation_errors(train, 3, 1e-9)
    assert errors["new-experience map"] < 1e-3 and errors["own map"] < 1e-3


def test_imputation_error_sees_a_map_that_differs_between_experiences():
    train = _affine_features(shared=False)
    errors = sb.imputation_errors(train, 3, 1e-9)
    # The old images' own map is still exact; the one fitted on the new experience is not.
    assert errors["own map"] < 1e-3
    assert errors["new-experience map"] > 0.1


def test_an_exemplar_memory_fits_the_old_images_own_map():
    train = _affine_features(shared=False)  # each experience has its own map
    got = sb.imputed_subspace(train, 0, 2, 1e-9, own=True, exemplars=5)
    assert torch.allclose(got, train.sub[2][0], atol=1e-3 * train.sub[2][0].abs().max())
    # The new experience's map is wrong on these images.
    wrong = sb.imputed_subspace(train, 0, 2, 1e-9, own=False)
    assert not torch.allclose(wrong, train.sub[2][0], atol=1e-1 * train.sub[2][0].abs().max())


def test_every_variant_is_scored_and_shared_maps_impute_the_exact_statistics(monkeypatch):
    # The synthetic subspaces are exact functions of the frozen features (a rank-deficient
    # concatenation), so only a tiny ridge imputes them closely enough for the head.
    monkeypatch.setattr(sb, "IMPUTE_RIDGES", (1e-10,))
    train, test = _affine_features(shared=True), _affine_features(shared=True, seed=1)
    acc = sb.accuracies(train, test, 3)
    assert {"frozen", "first-session", "subspaces, exact", "two-stage"} <= set(acc)
    assert all(0 <= v <= 100 for v in acc.values())
    assert acc["subspaces, imputed λ=1e-10"] == pytest.approx(acc["subspaces, exact"], abs=2.0)
    own = "subspaces, imputed by the old images' own map λ=1e-10 (needs them)"
    assert acc[own] == pytest.approx(acc["subspaces, exact"], abs=2.0)


def test_two_stage_reads_the_chosen_experiences_subspace():
    """Frozen features tell experiences apart, only each one's own expert its classes."""
    gen = torch.Generator().manual_seed(0)

    def features(seed):
        gen.manual_seed(seed)
        pre, sub, labels = [], [[], []], []
        for j in range(2):
            y = torch.arange(2 * j, 2 * j + 2).repeat_interleave(40)
            pre.append(torch.full((80, 2), 5.0 * j) + torch.randn(80, 2, generator=gen))
            for k in range(2):
                signal = (y % 2).float().unsqueeze(1) * 6 if k == j else 0
                sub[k].append(signal + torch.randn(80, 2, generator=gen))
            labels.append(y)
        return sb.Features(pre, sub, labels)

    accuracy, routed = sb.two_stage(features(0), features(1), 2)
    assert routed > 99 and accuracy > 95


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validation", "0"], "--validation must be in (0, 1)"),
        (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
        (["--set", "[1]"], "--set must be a JSON object"),
        (["--set", '{"strategy": "nope"}'], "strategy"),
        (["--seeds", "0,0"], "--seeds must not repeat a seed"),
        (["--set", '{"benchmark": "missing.npz"}'], "missing.npz"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["subspace_bound.py", "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(SystemExit) as exc:
        sb.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
