"""NSP guarantees: devices, dtypes, plugin order, edge cases, η, probes."""

import warnings

import pytest
import torch
from _helpers import make_vit

from cl_hres import ContinualViT, ExpertBank, NullSpaceConfig, NullSpaceGuard, distributed
from cl_hres.nsp.guard import PlasticityWarning, null_space_projector

RULES = [
    NullSpaceConfig(rule="energy", threshold=0.95),
    NullSpaceConfig(rule="ratio", threshold=30.0),
    NullSpaceConfig(rule="relative", threshold=1e-3),
]


# ----------------------------------------------------------------- projector edge cases
@pytest.mark.parametrize("config", RULES, ids=lambda c: c.rule)
def test_one_rule_for_empty_and_full_covariances(config):
    d = 6
    # No old input energy: nothing to protect, under every rule.
    proj, k = null_space_projector(torch.zeros(d, d, dtype=torch.float64), config)
    assert k == d
    torch.testing.assert_close(proj, torch.eye(d, dtype=torch.float64))
    # Rank one: exactly that direction is protected, under every rule.
    e0 = torch.zeros(d, dtype=torch.float64)
    e0[0] = 1
    proj, k = null_space_projector(torch.outer(e0, e0), config)
    assert k == d - 1 and proj[0].abs().max() < 1e-12
    # A spectrum with no small eigenvalue (cond = 2 <= a for ratio): the leading direction
    # is always protected, and ratio protects everything instead of nothing.
    flat = torch.diag(torch.linspace(1, 2, d, dtype=torch.float64))
    proj, k = null_space_projector(flat, config)
    assert k < d and proj[-1].abs().max() < 1e-12
    if config.rule != "energy":
        assert k == 0 and proj.abs().max() == 0


def _hres_model(**kw):
    return ContinualViT(make_vit(**kw), method="hres", num_classes=4)


def test_closed_bank_takes_no_expert_and_says_so_once():
    torch.manual_seed(0)
    model = _hres_model()
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(rule="relative", threshold=1e-10))
    model.begin_experience([([0, 1], [0])])
    model.eval()
    # 16 images = 64 patch tokens > d = 32: block 1's inputs span every direction (block
    # 0's are patch embeddings of 16 pixels plus position: they keep a null space).
    x = torch.randn(16, 1, 8, 8)
    with pytest.warns(PlasticityWarning) as record:
        guard.collect(model.features, [x])
    assert guard.null_dims[0] > 0 and guard.null_dims[1] == 0 and guard.closed_banks == [1]
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "1 of 2 expert banks (indices 1)" in message
    before = model.features(x)
    model.begin_experience([([2, 3], [0])])
    open_bank, closed_bank = model.banks
    # No dead expert: the closed bank keeps its one frozen expert, so it costs no more
    # at inference, and trains nothing...
    assert [b.num_experts for b in model.banks] == [2, 1]
    assert closed_bank.fused_weights()[0].shape[0] == closed_bank.rank
    assert closed_bank.trainable_down_weights() == []
    assert model.adapter_parameter_count() == 2 * 32 * open_bank.rank  # one down, one up
    assert torch.equal(model.features(x), before)
    # ...and the note is not repeated while nothing changes.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlasticityWarning)
        guard.collect(model.features, [x])


def test_relaxed_bank_with_empty_null_space_still_learns():
    torch.manual_seed(0)
    model = _hres_model()
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(threshold=1e-10, eta=0.9))
    model.begin_experience([([0, 1], [0])])
    model.eval()
    guard.collect(model.features, [torch.randn(16, 1, 8, 8)])
    assert guard.null_dims[1] == 0 and guard.closed_banks == []
    model.begin_experience([([2, 3], [0])])
    assert [b.num_experts for b in model.banks] == [2, 2]


# ------------------------------------------------------------------------ η relaxation
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_relaxation_projects_each_update_not_the_weight(eta):
    """SGD with a constant gradient: the part outside the null space must accumulate.

    Projecting the update gives ``−N·lr·(1−η)`` along the protected direction after N
    steps; multiplying the weight by ``P_η`` after each step would keep it near
    ``−lr·(1−η)/η``, and projecting the gradient as well would give ``−N·lr·(1−η)²``.
    """
    bank = ExpertBank(4, 4, rank=2, scale=1.0, activation="identity")
    guard = NullSpaceGuard([bank], NullSpaceConfig(rule="relative", threshold=1e-3, eta=eta))
    old = torch.zeros(10, 4)
    old[:, 0] = torch.randn(10)  # old inputs span e0 only
    guard.collect(bank, [old])
    assert guard.null_dims == [3]
    bank.add_expert()
    (w,) = bank.trainable_down_weights()
    with torch.no_grad():
        w.zero_()
    opt = torch.optim.SGD([w], lr=0.1)
    steps = 20
    for _ in range(steps):
        opt.zero_grad()
        w.grad = torch.ones_like(w)
        guard.step(opt)
    expected = torch.full_like(w, -steps * 0.1)
    expected[:, 0] *= 1 - eta
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    if eta == 1:
        assert torch.equal(w[:, 0], torch.zeros(2))  # exact: no leak at all


# ------------------------------------------------------------------------------- dtype
def test_bfloat16_backbone_gets_bfloat16_experts_and_float32_batches():
    torch.manual_seed(0)
    model = ContinualViT(make_vit().to(torch.bfloat16), method="hres", num_classes=4)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig(threshold=1e-3))
    x1, y1 = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])  # float32 images
    for classes, y in (([0, 1], y1), ([2, 3], y1 + 2)):
        model.begin_experience([(classes, [0])])
        assert {w.dtype for b in model.banks for w in b.trainable_down_weights()} == {
            torch.bfloat16
        }
        guard.project_weights()
        model.train()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x1), y)
            loss.backward()
            guard.step(opt)
        assert torch.isfinite(loss)
        model.eval()
        guard.collect(model.features, [x1])
    assert guard.accumulators[0].sums.dtype == torch.float64
    assert model.features(x1).dtype == torch.bfloat16


def test_bfloat16_backbone_in_a_strategy(digits_stream):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres import HResNSP

    strategy = HResNSP(
        model=make_vit().to(torch.bfloat16),
        train_mb_size=128,
        train_epochs=1,
        eval_mb_size=512,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    for exp in digits_stream.train_stream[:2]:
        strategy.train(exp)
    from cl_hres.reporting.metrics import accuracy_row_from_results

    row = accuracy_row_from_results(strategy.eval(digits_stream.test_stream[:2]), 2)
    assert min(row) > 0.5, row


# ------------------------------------------------------------------------ collectives
def test_backend_device_mapping(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, device, expected in [
        ("nccl", "cpu", "cuda:3"),
        ("nccl", "cuda:3", "cuda:3"),
        ("gloo", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:3", "cuda:3"),
    ]:
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        assert distributed.collective_device(device) == torch.device(expected), backend


def test_cuda_runs_join_a_group_with_a_cpu_backend(monkeypatch):
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend: chosen.append(backend)
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    assert distributed.init_from_env("cuda") == "cuda:1"
    assert distributed.init_from_env("cpu") == "cpu"
    assert chosen == ["cpu:gloo,cuda:nccl", "gloo"]


def test_every_collective_gets_a_tensor_on_the_backends_device(monkeypatch):
    """A fake 2-rank group whose backend only accepts CPU tensors, as NCCL only CUDA ones.

    The default device is switched to ``meta`` while the collectives run, so a tensor
    made without naming its device lands on the wrong device, as a CPU tensor does
    under NCCL on a GPU run.
    """
    torch.manual_seed(0)
    model = _hres_model()
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    model.begin_experience([([0, 1], [0])])
    model.eval()
    model.stats_head(0)
    x, y, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long)
    flag = torch.tensor(False)
    seen = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tuple(tensor.shape))
        assert tensor.device == torch.device("cpu"), f"{tuple(tensor.shape)} on {tensor.device}"

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with torch.device("meta"):
        distributed.gather_accuracy([0.5, 1.0], [10, 10])
        distributed.any_rank(flag)
        guard.collect(model.features, [x])  # covariance sums and token counts
        model.end_experience([(x, y, t)])  # head statistics
    assert len(seen) >= 4 + 2 * len(model.banks), seen


def test_two_ranks_combine_to_the_statistics_of_one_process(monkeypatch):
    """Rank 1, then rank 0, run their shards; the fake all-reduce sums what each sends."""
    import copy

    torch.manual_seed(0)
    model = _hres_model()
    model.begin_experience([([0, 1], [0])])
    model.eval()
    NullSpaceGuard(model.banks, NullSpaceConfig()).collect(
        model.features, [torch.randn(2, 1, 8, 8)]
    )
    shards = [torch.randn(3, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    single, ranks = copy.deepcopy(model), [copy.deepcopy(model) for _ in range(2)]
    single_guard = NullSpaceGuard(single.banks, NullSpaceConfig())
    single_guard.collect(single.features, shards)

    sent = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    for r in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)

        def all_reduce(tensor, op=None, group=None, async_op=False, r=r):
            if r == 1:
                sent.append(tensor.clone())
            else:
                tensor += sent.pop(0)

        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        guard = NullSpaceGuard(ranks[r].banks, NullSpaceConfig())
        guard.collect(ranks[r].features, [shards[r]])
    for a, b in zip(guard.accumulators, single_guard.accumulators):
        assert a.token_counts() == b.token_counts()
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=0)
    assert guard.null_dims == single_guard.null_dims


# ---------------------------------------------------------------- plugin order, probes
@pytest.fixture(scope="module")
def digits_stream():
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    from cl_hres.data.datasets import load_digits_data

    data = load_digits_data()
    return class_incremental_benchmark(
        {"train": data.train, "test": data.test}, num_experiences=5, seed=0
    )


def _naive_run(stream, order, nsp_config=None):
    """The README's reuse: the plugins on a plain Avalanche Naive strategy."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from cl_hres.avalanche import ContinualViTPlugin, FeatureDriftPlugin, NullSpaceProjectionPlugin
    from cl_hres.reporting.metrics import accuracy_row_from_results

    torch.manual_seed(0)
    model = _hres_model()
    plugins = {
        "nsp": NullSpaceProjectionPlugin(nsp_config or NullSpaceConfig(threshold=1e-6)),
        "vit": ContinualViTPlugin(),
        "drift": FeatureDriftPlugin(),
    }
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=64,
        train_epochs=1,
        eval_mb_size=512,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        plugins=[plugins[name] for name in order],
    )
    rows = []
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
        rows.append(accuracy_row_from_results(strategy.eval(stream.test_stream[:2]), 2))
    return strategy, plugins, rows


def test_plugin_order_does_not_change_results(digits_stream):
    a_strategy, a, rows_a = _naive_run(digits_stream, ["vit", "nsp", "drift"])
    b_strategy, b, rows_b = _naive_run(digits_stream, ["drift", "nsp", "vit"])
    images = sum(len(exp.dataset) for exp in digits_stream.train_stream[:2])
    for acc_a, acc_b in zip(a["nsp"].guard.accumulators, b["nsp"].guard.accumulators):
        # Each image counted once, whatever the order.
        assert acc_a.token_counts() == acc_b.token_counts() == [images, 4 * images]
        assert torch.equal(acc_a.sums, acc_b.sums)
    for p_a, p_b in zip(a["nsp"].guard.projectors, b["nsp"].guard.projectors):
        assert torch.equal(p_a, p_b)
    assert rows_a == rows_b
    assert a["nsp"].history == b["nsp"].history
    assert a["drift"].history == b["drift"].history
    # The history is written after the covariance of its experience is in.
    assert a["nsp"].history[-1]["null_space_dims"] == a["nsp"].guard.null_dims
    # One probe set per experience, kept by the drift plugin only.
    assert b["nsp"].state_dict() == {} and len(b["drift"].probes.x) == 2
    interference = {j: d["relative"] for j, d in b["drift"].history[-1]["drift"].items()}
    assert b["nsp"].history[-1]["interference"] == interference
    assert b["nsp"].history[-1]["experts"] == [b_.num_experts for b_ in b["nsp"].guard.banks]
    # Block 0 keeps the exact null space of 16-pixel patches, which new digits do not
    # reach either: it is dormant for the second experience, whichever plugin runs first.
    assert a["nsp"].history[-1]["dormant"] == [0]
    assert a["nsp"].history[-1]["experts"] == [1, 1]


def test_the_admission_pass_leaves_the_random_state_alone(digits_stream, monkeypatch):
    """Experts and head rows created after the pass are initialised as without it."""
    from cl_hres.avalanche import ContinualViTPlugin

    original = ContinualViTPlugin._admission_pass
    changed = []

    def watched(self, strategy):
        before = torch.get_rng_state()
        original(self, strategy)
        changed.append(not torch.equal(before, torch.get_rng_state()))

    monkeypatch.setattr(ContinualViTPlugin, "_admission_pass", watched)
    _naive_run(digits_stream, ["vit", "nsp"])
    assert changed == [False, False]  # both experiences asked; the second made a pass


def test_a_dormant_bank_loses_nothing_its_expert_would_have_learned(digits_stream):
    """Without the admission check block 0 takes a second expert; it learns nothing."""
    with_check, p_check, rows_check = _naive_run(digits_stream, ["vit", "nsp"])
    without, p_all, rows_all = _naive_run(
        digits_stream, ["vit", "nsp"], NullSpaceConfig(threshold=1e-6, min_free_energy=0)
    )
    assert p_all["nsp"].history[-1]["experts"] == [2, 1]
    assert p_all["nsp"].history[-1]["free_energy"][0] < 1e-6
    assert with_check.model.adapter_parameter_count() < without.model.adapter_parameter_count()
    assert rows_check == rows_all
    x = torch.cat(
        [digits_stream.test_stream[i].dataset[j][0][None] for i in range(2) for j in range(32)]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            with_check.model.features(x), without.model.features(x), rtol=1e-4, atol=1e-4
        )


def test_probes_are_stratified_over_the_experience_classes(digits_stream, monkeypatch):
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres import HResNSP
    from cl_hres.avalanche import FeatureProbes

    drift_passes = []
    drift = FeatureProbes.drift
    monkeypatch.setattr(
        FeatureProbes, "drift", lambda self, m: drift_passes.append(1) or drift(self, m)
    )
    strategy = HResNSP(
        model=make_vit(),
        train_mb_size=128,
        train_epochs=1,
        eval_mb_size=512,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    for exp in digits_stream.train_stream[:2]:
        strategy.train(exp)
    probes = strategy.drift_plugin.probes
    for exp, y in zip(digits_stream.train_stream[:2], probes.y):
        classes = sorted(exp.classes_in_this_experience)
        counts = [int((y == c).sum()) for c in classes]
        assert len(classes) >= 2 and max(counts) - min(counts) <= 1, counts
        assert sum(counts) == probes.size
    # Drift and interference come from one run of the probes per experience, and the
    # probe images are stored once (by the drift plugin).
    assert len(drift_passes) == 2
    assert strategy.nsp_plugin.state_dict() == {}


def test_class_spread_is_measured_on_reference_features():
    """Features that collapse later must not turn drift into 1/0."""
    from cl_hres.avalanche import FeatureProbes

    class Collapsing(torch.nn.Module):
        scale = 1.0

        def features(self, x):
            return x.flatten(1) * self.scale

    model = Collapsing()
    probes = FeatureProbes(4)
    probes.x = [torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]])]
    probes.y = [torch.tensor([0, 1, 0, 1])]
    probes.ref = [model.features(probes.x[0])]
    model.scale = 0.0  # every feature collapses to zero
    (d,) = probes.drift(model).values()
    # RMS feature norm sqrt(10/4) over the reference class spread 1 (means 2 apart).
    assert d["class_spreads"] == pytest.approx((10 / 4) ** 0.5)
    assert d["relative"] == pytest.approx(1.0)
