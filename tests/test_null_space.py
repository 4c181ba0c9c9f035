"""Null-space projection: projector algebra and protection of old features."""

import sys

import pytest
import torch
from _helpers import make_vit

from cl_hres import ContinualViT, CovarianceAccumulator, NullSpaceConfig, NullSpaceGuard
from cl_hres.errors import ConfigError
from cl_hres.nsp.guard import null_space_projector


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
            guard.step(opt)
        else:
            opt.step()
        losses.append(loss.item())
    return losses


def _relative_change(model, x, before):
    model.eval()
    return ((model.features(x) - before).norm() / before.norm()).item()


def _second_experience(model, guard, x1, x2, y2, steps, opt_name, lr):
    """Trains experience 2 with the head frozen; returns what the guarantees are about."""
    model.eval()
    guard.collect(model.features, [x1])
    old = model.features(x1)
    model.begin_experience([([2, 3], [0])])
    # The head is frozen: only the new experts can lower the loss, so a projection that
    # zeroes them (or never lets them move) shows up as a flat loss and unmoved features.
    model.train_head.requires_grad_(False)
    new_before = model.features(x2)
    model.train()
    losses = _train(model, x2, y2, steps, opt_name, guard, lr=lr)
    downs = [w for bank in model.banks for w in bank.trainable_down_weights()]
    return {
        "old": _relative_change(model, x1, old),
        "new": _relative_change(model, x2, new_before),
        "losses": losses,
        "down_norms": [w.norm().item() for w in downs],
        "experts": len(downs),
    }


def _two_experiences(opt_name: str, use_nsp: bool):
    torch.manual_seed(1)
    model = ContinualViT(make_vit(), method="hres", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(rule="relative", threshold=1e-10))
    # Exact-span setting: expert 1's data is 2 images (10 tokens), far fewer than d = 32.
    x1, y1 = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    x2, y2 = torch.randn(32, 1, 8, 8), torch.randint(2, 4, (32,))
    model.begin_experience([([0, 1], [0])])
    _train(model, x1, y1, 20, opt_name)
    lr = 1e-2 if opt_name != "sgd" else 0.5
    out = _second_experience(
        model, guard if use_nsp else _NoGuard(guard), x1, x2, y2, 60, opt_name, lr
    )
    return out, guard


class _NoGuard:
    """Collects statistics like the guard but never projects."""

    def __init__(self, guard):
        self.collect = guard.collect

    def project_weights(self):
        pass

    def step(self, opt):
        opt.step()


def _assert_protected_and_learning(out, banks):
    assert out["old"] <= 1e-4, out["old"]
    # Every bank got a new expert, it is not zero, and it moves the new task's features.
    assert out["experts"] == banks
    assert min(out["down_norms"]) > 1e-3, out["down_norms"]
    assert out["new"] > 1e-2, out["new"]
    assert out["losses"][-1] < 0.75 * out["losses"][0], out["losses"][::10]


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd"])
def test_nsp_keeps_old_features_while_new_expert_learns(opt_name):
    out, guard = _two_experiences(opt_name, use_nsp=True)
    _assert_protected_and_learning(out, len(guard.banks))
    assert all(0 < k < 32 for k in guard.null_dims)


def test_without_nsp_old_features_move():
    out, _ = _two_experiences("adam", use_nsp=False)
    assert out["old"] > 1e-2, out["old"]


def test_lora_banks_are_protected_too():
    torch.manual_seed(2)
    model = ContinualViT(make_vit(), method="lora", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(rule="relative", threshold=1e-10))
    x1 = torch.randn(2, 1, 8, 8)
    model.begin_experience([([0, 1], [0])])
    _train(model, x1, torch.tensor([0, 1]), 10, "adam")
    x2, y2 = torch.randn(16, 1, 8, 8), torch.randint(2, 4, (16,))
    out = _second_experience(model, guard, x1, x2, y2, 40, "adam", 1e-2)
    _assert_protected_and_learning(out, len(guard.banks))


def test_nsp_state_is_part_of_the_model():
    model = ContinualViT(make_vit(), method="hres", num_classes=2)
    model.begin_experience([([0, 1], [0])])
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    model.eval()
    guard.collect(model.features, [torch.randn(4, 1, 8, 8)])
    names = dict(model.named_buffers())
    for i, bank in enumerate(model.banks):
        prefix = f"backbone.blocks.{i}.bank.null_space."
        # Buffers of the model: saved by state_dict, moved by .to(), seen by DDP.
        assert names[prefix + "covariance.sums"] is guard.accumulators[i].sums
        assert names[prefix + "projector"] is guard.projectors[i]
        assert bank.null_space is guard.states[i]
    # A fresh model with a guard takes the whole NSP state from the model's state dict.
    other = ContinualViT(make_vit(), method="hres", num_classes=2)
    other.begin_experience([([0, 1], [0])])
    other_guard = NullSpaceGuard(other.banks, NullSpaceConfig())
    assert other_guard.projectors is None
    other.load_state_dict(model.state_dict())
    assert other_guard.null_dims == guard.null_dims
    for a, b in zip(other_guard.projectors, guard.projectors):
        assert torch.equal(a, b)
    for a, b in zip(other_guard.accumulators, guard.accumulators):
        assert torch.equal(a.sums, b.sums) and a.token_counts() == b.token_counts()
    # Casting the model does not round the statistics; moving it moves them.
    other.to(torch.bfloat16)
    assert other_guard.accumulators[0].sums.dtype == torch.float64
    assert other_guard.projectors[0].dtype == torch.float32
    other.to("meta")
    assert other_guard.accumulators[0].sums.device.type == "meta"
    assert other_guard.projectors[0].device.type == "meta"


def test_empty_bank_statistics_live_on_the_banks_device():
    model = ContinualViT(make_vit(), method="hres", num_classes=2).to("meta")
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())  # no expert yet
    assert all(b.num_experts == 0 for b in model.banks)
    assert {a.sums.device.type for a in guard.accumulators} == {"meta"}
    model.begin_experience([([0, 1], [0])])
    assert {w.device.type for b in model.banks for w in b.trainable_down_weights()} == {"meta"}


def test_collecting_copies_no_statistics_in_one_process(monkeypatch):
    model = ContinualViT(make_vit(), method="hres", num_classes=2)
    model.begin_experience([([0, 1], [0])])
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    model.eval()
    guard.collect(model.features, [torch.randn(4, 1, 8, 8)])
    big = []
    clone = torch.Tensor.clone

    def counting_clone(t, *a, **kw):
        if t.numel() >= 32 * 32:
            big.append(tuple(t.shape))
        return clone(t, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    guard.collect(model.features, [torch.randn(4, 1, 8, 8)])
    assert big == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "svd"},
        {"rule": "energy", "threshold": 1.5},
        {"rule": "ratio", "threshold": 0.5},
        {"eta": 0},
        {"eta": 1.2},
        {"min_free_energy": -1e-6},
        {"min_free_energy": 1.0},
        {"min_free_energy": float("nan")},
        {"min_selectivity": -1.0},
        {"min_selectivity": float("nan")},
        {"min_selectivity": float("inf")},
        {"min_selectivity": True},
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
    start = [w.detach().clone() for b in model.banks for w in b.trainable_down_weights()]
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.randn(8, 1, 8, 8)), torch.randint(2, 4, (8,))
        ).backward()
        guard.step(opt)
    weights = [w for b in model.banks for w in b.trainable_down_weights()]
    assert len(weights) == len(model.banks)
    for bank, proj in zip(guard.banks, guard.projectors):
        for w in bank.trainable_down_weights():
            torch.testing.assert_close(w @ proj, w, atol=1e-6, rtol=0)
    # ...and they are not trivially there: non-zero, and they moved.
    for w, w0 in zip(weights, start):
        assert w.norm() > 1e-2 and w0.norm() > 1e-2
        assert (w - w0).norm() > 1e-3


@pytest.mark.parametrize("head", ["ridge", "linear"])
def test_covariance_shares_the_head_statistics_pass(head, monkeypatch):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres import HResNSP
    from cl_hres.data.datasets import load_digits_data

    data = load_digits_data()
    bm = class_incremental_benchmark(
        {"train": data.train, "test": data.test}, num_experiences=5, seed=0
    )
    import cl_hres.avalanche.nsp_plugin
    import cl_hres.avalanche.vit_plugin
    from cl_hres.avalanche.experience_data import eval_batches

    passes = []

    def counted(strategy):  # records which function asked for a pass over the data
        passes.append(sys._getframe(1).f_code.co_name)
        return eval_batches(strategy)

    # Both plugins can make the pass: the head's (vit_plugin) or the covariance's own.
    for module in (cl_hres.avalanche.vit_plugin, cl_hres.avalanche.nsp_plugin):
        monkeypatch.setattr(module, "eval_batches", counted)
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
        assert acc.token_counts() == [images, 4 * images]
    # ...in one pass over the data per experience: the head's when there is one, else
    # the plugin's own; plus, from the second experience on, the admission pass made
    # before the experience's experts exist.
    assert sorted(passes) == sorted(
        ["statistics_pass_once" if head == "ridge" else "after_training_exp"] * 2
        + ["_admission_pass"]
    )


@pytest.mark.parametrize("separate_prefix", [True, False])
def test_free_energy_is_the_inputs_share_in_the_null_space(separate_prefix):
    """tr(P·Σ)/tr(Σ) per bank, for the pass's own inputs and for the older ones."""
    from cl_hres.nn.experts import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(8, 8, rank=2, scale=1.0, num_prefix_tokens=1)
    bank.add_expert()
    config = NullSpaceConfig(rule="relative", threshold=0.05, separate_prefix=separate_prefix)
    guard = NullSpaceGuard([bank], config)

    def tokens(n, dims, faint=None):  # (n, 1 + 4, 8): prefix and patch tokens
        x = torch.zeros(n, 5, 8)
        x[..., dims] = torch.randn(n, 5, len(dims))
        if faint is not None:  # 1% of one direction's energy: below the threshold
            x[..., faint] = 0.1 * torch.randn(n, 5)
        return x

    guard.collect(bank, [tokens(256, [0, 1, 2, 3], faint=4)])
    assert guard.free_energy == [None]  # nothing constrained the first experience
    assert guard.null_dims == [4]  # directions 4..7: the faint one counts as null
    guard.collect(bank, [tokens(256, [0, 1, 2, 3])])
    new, old = guard.free_energy[0]
    assert new == pytest.approx(0.0, abs=1e-4)  # the sample couples the faint direction
    assert old == pytest.approx(0.01 / 4.01, rel=0.3)  # the faint direction's share
    # Equal energy in an old and in a null direction (every token): half is free.
    x = tokens(256, [0])
    x[..., 5] = x[..., 0]
    guard.collect(bank, [x])
    assert guard.free_energy[0][0] == pytest.approx(0.5, abs=1e-4)
    # The measurement reads the projector the pass was trained under, before refreshing.
    assert guard.null_dims == [3]  # 4, 6, 7


def test_admission_makes_a_bank_dormant_where_new_inputs_miss_its_free_directions():
    """Bank 0's new inputs lie in the old span (share 0), bank 1's have 1% off it."""
    from cl_hres.nn.experts import ExpertBank

    torch.manual_seed(0)
    banks = [ExpertBank(6, 6, rank=2, scale=1.0) for _ in range(2)]
    for bank in banks:
        bank.add_expert()
    guard = NullSpaceGuard(banks, NullSpaceConfig(rule="relative", threshold=1e-6))

    def forward(pair):
        return [bank(x) for bank, x in zip(banks, pair)]

    def inputs(faint=None):
        x = torch.zeros(256, 6)
        x[:, :3] = torch.randn(256, 3)
        if faint is not None:
            x[:, faint] = 0.1 * torch.randn(256)
        return x

    assert not guard.needs_admission_pass  # no projector yet: nothing to decide
    guard.collect(forward, [(inputs(), inputs())])
    assert guard.null_dims == [3, 3] and guard.needs_admission_pass
    sums = [a.sums.clone() for a in guard.accumulators]
    with guard.admitting():
        forward((inputs(), inputs(faint=4)))
    # The old statistics and projectors are untouched by the admission pass.
    assert all(torch.equal(a.sums, b) for a, b in zip(guard.accumulators, sums))
    assert guard.null_dims == [3, 3]
    dormant_share, open_share = guard.admission_energy
    assert dormant_share < 1e-9
    assert open_share == pytest.approx(0.01 / 3.01, rel=0.3)
    assert guard.dormant_banks == [0]
    assert [bank.add_expert() for bank in banks] == [None, "expert1"]
    assert [bank.num_experts for bank in banks] == [1, 2]
    assert banks[0].trainable_down_weights() == []  # its old expert is frozen all the same
    # Dormancy lasts one experience.
    guard.wake()
    assert banks[0].accepts_experts and guard.dormant_banks == []
    # 0 turns the check off: no pass is asked for.
    off = NullSpaceGuard(banks, NullSpaceConfig(threshold=1e-6, min_free_energy=0))
    assert not off.needs_admission_pass
    # ...as does a relaxation that lets through 1 − η ≥ the threshold of every input.
    relaxed = NullSpaceGuard(banks, NullSpaceConfig(threshold=1e-6, eta=0.9))
    assert not relaxed.needs_admission_pass


def test_selectivity_admits_only_banks_whose_free_directions_tell_new_from_old():
    """A loose threshold leaves faint old directions free. Bank 0's new inputs use them as
    faintly as the old ones did (ratio ~1), bank 1's 30x more strongly (ratio ~900)."""
    from cl_hres.nn.experts import ExpertBank

    torch.manual_seed(0)
    banks = [ExpertBank(6, 6, rank=2, scale=1.0) for _ in range(2)]
    for bank in banks:
        bank.add_expert()

    def inputs(faint: float) -> torch.Tensor:
        x = torch.randn(512, 6)
        x[:, 3:] *= faint
        return x

    def forward(pair):
        return [bank(x) for bank, x in zip(banks, pair)]

    def admit(min_selectivity: float) -> list[int]:
        # With the selectivity test on, it alone asks for the pass (min_free_energy 0).
        energy = 0.0 if min_selectivity else 1e-6
        cfg = NullSpaceConfig(
            threshold=1e-3, min_free_energy=energy, min_selectivity=min_selectivity
        )
        guard = NullSpaceGuard(banks, cfg)
        guard.collect(forward, [(inputs(0.01), inputs(0.01))])
        assert guard.null_dims == [3, 3] and guard.needs_admission_pass
        with guard.admitting():
            forward((inputs(0.01), inputs(0.3)))
        return guard

    # Both shares are far above min_free_energy: without the ratio test both banks admit.
    assert admit(0.0).dormant_banks == []
    guard = admit(10.0)
    assert guard.dormant_banks == [0]
    # What decided it: the new and the old inputs' shares (3·0.01² / 3 ≈ 1e-4 for both of
    # bank 0; 3·0.3² / (3 + 3·0.3²) ≈ 0.08 for bank 1's new inputs).
    new, old = guard.admission_energy, guard.admission_old_energy
    assert new[0] == pytest.approx(1e-4, rel=0.3) and old[0] == pytest.approx(1e-4, rel=0.3)
    assert new[1] == pytest.approx(0.083, rel=0.3) and old[1] == pytest.approx(1e-4, rel=0.3)
    guard.wake()  # the next experience starts unmeasured
    assert guard.admission_energy == guard.admission_old_energy == [None, None]
    # A relaxation η < 1 does not switch the ratio test off (it does the energy test).
    relaxed = NullSpaceConfig(threshold=1e-3, eta=0.9, min_free_energy=1e-6, min_selectivity=10)
    guard = NullSpaceGuard(banks, relaxed)
    guard.collect(forward, [(inputs(0.01), inputs(0.01))])
    assert guard.needs_admission_pass
    guard.config.min_selectivity = 0.0
    assert not guard.needs_admission_pass
