"""First-session adaptation (``aper``) and the ``[pretrained, adapted]`` head features."""

import pytest
import torch
from _helpers import make_vit

from cl_hres.errors import ConfigError
from cl_hres.nn.model import ContinualViT
from cl_hres.nsp.config import NullSpaceConfig


def _trained_expert_model(method: str = "hres", **kwargs) -> ContinualViT:
    model = ContinualViT(make_vit(), method=method, num_classes=4, **kwargs)
    model.begin_experience([([0, 1], [0])])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("train_head"):
                p.normal_()  # as if trained: up weights are zero at first
    return model.eval()


@pytest.mark.parametrize("method", ["hres", "lora", "vpt"])
def test_concatenated_features_are_pretrained_then_adapted(method):
    torch.manual_seed(0)
    plain = make_vit().eval()
    model = _trained_expert_model(method, concat_pretrained=True)
    x = torch.randn(5, 1, 8, 8)
    f = model.features(x)
    width = plain.num_features
    assert f.shape == (5, 2 * width) and model.num_features == 2 * width
    # The first half is the untouched backbone's, bit for bit, although the experts are
    # non-zero; the second half is the adapted model's and differs from it.
    reference = plain.forward_head(plain.forward_features(x), pre_logits=True)
    assert torch.equal(f[:, :width], reference)
    assert (f[:, width:] - reference).abs().max() > 1e-3
    switched = [m for m in model.modules() if hasattr(m, "enabled")]
    assert switched and all(m.enabled for m in switched)  # switched back on


def test_disabled_pass_does_not_feed_the_null_space_statistics():
    from cl_hres.nsp.guard import NullSpaceGuard

    model = _trained_expert_model(concat_pretrained=True)
    guard = NullSpaceGuard(model.banks, NullSpaceConfig())
    x = torch.randn(3, 1, 8, 8)
    guard.collect(model.features, [x])
    tokens = 3 * 5  # 4 patches + cls per image, counted once: the pretrained pass is skipped
    assert all(sum(s.covariance.token_counts()) == tokens for s in guard.states)


def test_first_session_adapts_once_then_only_fits_the_head(monkeypatch):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres.avalanche.strategies import FirstSessionAdaptation
    from cl_hres.data.datasets import load_digits_data

    data = load_digits_data()
    stream = class_incremental_benchmark(
        {"train": data.train, "test": data.test}, num_experiences=5, seed=0
    )
    strategy = FirstSessionAdaptation(
        model=make_vit(),
        train_mb_size=128,
        train_epochs=2,
        eval_mb_size=512,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    steps = {"n": 0}

    def count(self, **kwargs):
        steps["n"] += 1

    monkeypatch.setattr(type(strategy), "_after_training_iteration", count)
    strategy.train(stream.train_stream[0])
    after_first = steps["n"]
    expert = {n: p.detach().clone() for n, p in strategy.model.named_parameters() if ".bank." in n}
    assert after_first > 0 and any(v.abs().sum() > 0 for k, v in expert.items() if ".up." in k)
    strategy.train(stream.train_stream[1])
    # No SGD step after the first session, no new expert, and the expert is unchanged.
    assert steps["n"] == after_first
    now = {n: p for n, p in strategy.model.named_parameters() if ".bank." in n}
    assert now.keys() == expert.keys()
    assert all(torch.equal(now[k], v) and not now[k].requires_grad for k, v in expert.items())
    # Yet the second experience's classes are learned (closed-form head on both halves).
    from cl_hres.reporting.metrics import accuracy_row_from_results

    row = accuracy_row_from_results(strategy.eval(stream.test_stream[:2]), 2)
    assert min(row) > 0.5, row


@pytest.mark.parametrize("method", ["linear", "finetune"])
def test_concatenation_needs_switchable_experts(method):
    with pytest.raises(ConfigError, match="concat_pretrained"):
        ContinualViT(make_vit(), method=method, concat_pretrained=True)


def test_run_config_rejects_concatenation_without_experts():
    from cl_hres.run.config import RunConfig

    with pytest.raises(ConfigError, match="concat_pretrained"):
        RunConfig(strategy="linear", concat_pretrained=True)
    assert RunConfig(strategy="aper").method_config().rank == 32
