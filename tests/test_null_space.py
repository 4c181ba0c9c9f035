"""Null-space projection: projector algebra and protection of old features."""

import pytest
import torch
from _helpers import make_vit

from cl_hres import ContinualViT, CovarianceAccumulator, NullSpaceConfig, NullSpaceGuard
from cl_hres.errors import ConfigError
from cl_hres.null_space import null_space_projector


@pytest.mark.parametrize(
    "config",
    [
        NullSpaceConfig(rule="energy", threshold=0.95),
        NullSpaceConfig(rule="ratio", threshold=30.0),
        NullSpaceConfig(rule="relative", threshold=1e-3),
    ],
)
def test_projector_is_symmetric_idempotent_and_orthogonal_to_protected(config):
    torch.manual_seed(0)
    # A spectrum spanning several decades so every rule finds a non-trivial split.
    q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    evals = torch.logspace(0, -8, 24, dtype=torch.float64)
    sigma = q @ torch.diag(evals) @ q.T
    proj, k = null_space_projector(sigma, config)
    assert 0 < k < 24
    torch.testing.assert_close(proj, proj.T)
    torch.testing.assert_close(proj @ proj, proj, atol=1e-10, rtol=0)
    protected = q[:, : 24 - k]  # eigenvectors of the largest eigenvalues
    assert (proj @ protected).abs().max() < 1e-10
    assert torch.isclose(torch.trace(proj), torch.tensor(float(k), dtype=torch.float64))


def test_relaxation_mixes_identity():
    sigma = torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64))
    proj, k = null_space_projector(sigma, NullSpaceConfig(rule="relative", threshold=1e-3, eta=0.9))
    assert k == 1
    torch.testing.assert_close(proj, torch.diag(torch.tensor([0.1, 1.0], dtype=torch.float64)))


def test_accumulator_groups_protect_small_cls_token():
    torch.manual_seed(0)
    acc = CovarianceAccumulator(8, num_prefix_tokens=1)
    x = torch.zeros(64, 5, 8)
    x[:, 0, 0] = 0.01 * torch.randn(64)  # tiny cls token along e0
    x[:, 1:, 1:] = 10 * torch.randn(64, 4, 7)
    acc.update(x)
    proj, k = null_space_projector(acc.matrix(), NullSpaceConfig(rule="energy", threshold=0.99))
    # The cls direction e0 is protected despite being 1000× smaller than the patches.
    assert proj[0, 0].abs() < 1e-6
    pooled = CovarianceAccumulator(8, num_prefix_tokens=1, separate_prefix=False)
    pooled.update(x)
    proj_pooled, _ = null_space_projector(
        pooled.matrix(), NullSpaceConfig(rule="energy", threshold=0.99)
    )
    assert proj_pooled[0, 0] > 0.99  # a pooled covariance would let e0 change


def test_accumulator_is_accurate_over_many_tokens():
    torch.manual_seed(0)
    acc = CovarianceAccumulator(4)
    chunks = [torch.randn(20_000, 4) + 3 for _ in range(50)]  # a million tokens
    for c in chunks:
        acc.update(c)
    exact = sum((c.double().T @ c.double()) for c in chunks)
    torch.testing.assert_close(acc.sums[0], exact, rtol=1e-12, atol=0)
    fast = CovarianceAccumulator(4, precision="float32")
    for c in chunks:
        fast.update(c)
    torch.testing.assert_close(fast.sums[0], exact, rtol=1e-5, atol=0)
    assert acc.num_tokens == 1_000_000


def _train(model, x, y, steps, opt_name, guard=None, lr=1e-2):
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt_name](
        model.trainable_parameters(), lr=lr
    )
    if guard is not None:
        guard.project_weights()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if guard is not None:
            guard.project_grads()
        opt.step()
        if guard is not None:
            guard.project_weights()
        losses.append(loss.item())
    return losses


def _two_experiences(opt_name: str, use_nsp: bool):
    torch.manual_seed(1)
    model = ContinualViT(make_vit(), method="hres", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(rule="relative", threshold=1e-10))
    # Exact-span setting: expert 1's data is 2 images (10 tokens), far fewer than d = 32.
    x1, y1 = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    x2, y2 = torch.randn(32, 1, 8, 8), torch.randint(2, 4, (32,))
    model.begin_experience([([0, 1], [0])])
    _train(model, x1, y1, 20, opt_name)
    model.eval()
    guard.collect(model.features, [x1])
    old = model.features(x1)
    model.begin_experience([([2, 3], [0])])
    model.train()
    losses = _train(
        model,
        x2,
        y2,
        60,
        opt_name,
        guard if use_nsp else None,
        lr=1e-2 if opt_name != "sgd" else 0.5,
    )
    model.eval()
    rel = ((model.features(x1) - old).norm() / old.norm()).item()
    return rel, losses, guard


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd"])
def test_nsp_keeps_old_features_while_new_expert_learns(opt_name):
    rel, losses, guard = _two_experiences(opt_name, use_nsp=True)
    assert rel <= 1e-4, rel
    assert losses[-1] < 0.75 * losses[0], losses[::10]
    assert all(0 < k < 32 for k in guard.null_dims)


def test_without_nsp_old_features_move():
    rel, _, _ = _two_experiences("adam", use_nsp=False)
    assert rel > 1e-2, rel


def test_lora_banks_are_protected_too():
    torch.manual_seed(2)
    model = ContinualViT(make_vit(), method="lora", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(rule="relative", threshold=1e-10))
    x1 = torch.randn(2, 1, 8, 8)
    model.begin_experience([([0, 1], [0])])
    _train(model, x1, torch.tensor([0, 1]), 10, "adam")
    model.eval()
    guard.collect(model.features, [x1])
    old = model.features(x1)
    model.begin_experience([([2, 3], [0])])
    model.train()
    _train(model, torch.randn(16, 1, 8, 8), torch.randint(2, 4, (16,)), 40, "adam", guard)
    model.eval()
    assert ((model.features(x1) - old).norm() / old.norm()).item() <= 1e-4


def test_guard_state_round_trip():
    model = ContinualViT(make_vit(), method="hres", num_classes=2)
    model.begin_experience([([0, 1], [0])])
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    model.eval()
    guard.collect(model.features, [torch.randn(4, 1, 8, 8)])
    other = NullSpaceGuard(model.banks, NullSpaceConfig())
    other.load_state_dict(guard.state_dict())
    assert other.null_dims == guard.null_dims
    for a, b in zip(other.projectors, guard.projectors):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "svd"},
        {"rule": "energy", "threshold": 1.5},
        {"rule": "ratio", "threshold": 0.5},
        {"eta": 0},
        {"eta": 1.2},
    ],
)
def test_bad_nsp_configs(kwargs):
    with pytest.raises(ConfigError):
        NullSpaceConfig(**kwargs)


def test_guard_step_keeps_weights_in_null_space():
    torch.manual_seed(3)
    model = ContinualViT(make_vit(), method="hres", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    x1 = torch.randn(2, 1, 8, 8)
    model.begin_experience([([0, 1], [0])])
    model.eval()
    guard.collect(model.features, [x1])
    model.begin_experience([([2, 3], [0])])
    guard.project_weights()
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.randn(8, 1, 8, 8)), torch.randint(2, 4, (8,))
        ).backward()
        guard.step(opt)
    for bank, proj in zip(guard.banks, guard.projectors):
        for w in bank.trainable_down_weights():
            torch.testing.assert_close(w @ proj, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["ridge", "linear"])
def test_covariance_shares_the_head_statistics_pass(head, monkeypatch):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres import HResNSP
    from cl_hres.data import load_digits_data

    data = load_digits_data()
    bm = class_incremental_benchmark(
        {"train": data.train, "test": data.test}, num_experiences=5, seed=0
    )
    own_passes = []
    collect = NullSpaceGuard.collect
    monkeypatch.setattr(
        NullSpaceGuard, "collect", lambda self, *a: own_passes.append(1) or collect(self, *a)
    )
    strategy = HResNSP(
        model=make_vit(),
        train_mb_size=64,
        train_epochs=1,
        eval_mb_size=256,
        head=head,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    for exp in bm.train_stream[:2]:
        strategy.train(exp)
    images = sum(len(exp.dataset) for exp in bm.train_stream[:2])
    # Every training image counted exactly once per experience (cls group, 4 patches)...
    for acc in strategy.nsp_plugin.guard.accumulators:
        assert acc.counts == [images, 4 * images]
    # ...through the head's pass when there is one, else through the plugin's own pass.
    assert len(own_passes) == (0 if head == "ridge" else 2)
