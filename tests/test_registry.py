"""One registration adds a method: the model, config, CLI, strategies and FWT follow."""

import json

import pytest
import torch
from torch import nn

from cl_hres import registry


class _Scale(nn.Module):
    """A toy method: a learnable per-channel scale after the final norm."""

    def __init__(self, norm: nn.Module, width: int) -> None:
        super().__init__()
        self.norm = norm
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


def _attach_scale(vit: nn.Module, config: object) -> list:
    vit.norm = _Scale(vit.norm, vit.num_features)
    return []


@pytest.fixture
def toy_strategy():
    spec = registry.register_strategy(
        registry.StrategySpec(
            "toy-scale",
            "a learnable channel scale (test)",
            method=registry.MethodSpec("toy-scale", attach=_attach_scale),
            expert_per_experience=False,
        )
    )
    yield spec
    registry.STRATEGIES.pop(spec.name)
    registry.METHODS.pop(spec.method_name)


def test_a_toy_method_needs_one_registration(toy_strategy, tmp_path, capsys):
    from cl_hres.avalanche.strategies import STRATEGIES
    from cl_hres.cli import app as cli

    assert "toy-scale" in cli.strategy_help()
    cls = STRATEGIES["toy-scale"]
    assert cls.method == "toy-scale" and not cls.uses_nsp
    out = tmp_path / "run"
    argv = ["run", "--strategy", "toy-scale", "--experiences", "2", "--epochs", "1"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["strategy"] == "toy-scale"
    # The scale trained (its parameters are the method's) and references were built.
    assert res["trainable_parameters"]["adapter_last_experience"] == 96
    assert len(res["forward_transfer"]["per_experience"]) == 2


def test_built_in_strategy_classes_follow_their_registry_entries():
    from cl_hres.avalanche.strategies import STRATEGIES
    from cl_hres.run.config import RunConfig

    assert sorted(STRATEGIES) == sorted(registry.STRATEGIES)
    for name, spec in registry.STRATEGIES.items():
        cls = STRATEGIES[name]
        assert cls.name == name and cls.method == spec.method_name
        assert cls.uses_nsp == spec.uses_nsp
        assert cls.trains_whole_stream == spec.trains_whole_stream
        config = RunConfig(strategy=name).method_config()
        assert type(config) is (spec.method_spec.config_class or type(None))


def test_registering_twice_or_an_unknown_method_fails():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_strategy(registry.StrategySpec("hres", "again"))
    with pytest.raises(ValueError, match="unknown method"):
        registry.register_strategy(registry.StrategySpec("x", "x", method="nope"))
    assert "x" not in registry.STRATEGIES


def test_registry_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="JointTraining"):
        registry.register_strategy(
            registry.StrategySpec("toy-joint", "x", trains_whole_stream=True)
        )
    spec = registry.register_strategy(registry.StrategySpec("toy-ref", "x", reference="lora"))
    try:
        with pytest.raises(ValueError, match="reference"):
            _ = spec.reference_strategy
    finally:
        registry.STRATEGIES.pop("toy-ref")


def test_a_ready_model_must_match_the_strategy():
    from _helpers import make_vit

    from cl_hres.avalanche.strategies import FirstSessionAdaptation
    from cl_hres.errors import ConfigError
    from cl_hres.nn.model import ContinualViT

    with pytest.raises(ConfigError, match="expert_per_experience"):
        FirstSessionAdaptation(model=ContinualViT(make_vit(), method="hres"))
    ready = FirstSessionAdaptation.build_model(make_vit())
    assert FirstSessionAdaptation(model=ready).model is ready
