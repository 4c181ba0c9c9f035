"""The protocols through which the runner and the plugins find each other."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from cl_hres.avalanche import (
    CheckpointablePlugin,
    ContinualViTPlugin,
    FeatureDriftPlugin,
    FiniteLossPlugin,
    NullSpaceProjectionPlugin,
    StatisticsPassListener,
    checkpointable_plugins,
    find_plugin,
)


def test_checkpointable_plugins_are_found_by_type_in_plugin_order():
    vit, drift, nsp, loss = (
        ContinualViTPlugin(),
        FeatureDriftPlugin(),
        NullSpaceProjectionPlugin(),
        FiniteLossPlugin(),
    )
    strategy = SimpleNamespace(plugins=[vit, drift, nsp, loss])
    assert checkpointable_plugins(strategy) == {"drift": drift, "nsp": nsp}
    assert find_plugin(strategy, FeatureDriftPlugin) is drift
    assert find_plugin(SimpleNamespace(plugins=[loss]), FeatureDriftPlugin) is None
    assert isinstance(nsp, StatisticsPassListener) and not isinstance(drift, StatisticsPassListener)
    # Two plugins under one key would mix their checkpointed tensors.
    with pytest.raises(ValueError, match="checkpoint_key"):
        checkpointable_plugins(SimpleNamespace(plugins=[drift, FeatureDriftPlugin()]))


def test_the_statistics_pass_feeds_every_listener_once_per_experience(monkeypatch):
    fed = []

    class Listener(StatisticsPassListener):
        @contextmanager
        def statistics_pass(self, strategy):
            fed.append(strategy.clock.train_exp_counter)
            yield

    ends = []
    model = SimpleNamespace(has_statistics_pass=True, end_experience=ends.append)
    vit = ContinualViTPlugin()
    strategy = SimpleNamespace(
        plugins=[Listener(), vit, Listener()],
        model=model,
        clock=SimpleNamespace(train_exp_counter=0),
    )
    monkeypatch.setattr("cl_hres.avalanche.vit_plugin.eval_batches", lambda s: "batches")
    assert vit.statistics_pass_once(strategy) and vit.statistics_pass_once(strategy)
    strategy.clock.train_exp_counter = 1
    assert vit.statistics_pass_once(strategy)
    # A linear head has no pass: listeners are told to make their own.
    model.has_statistics_pass = False
    strategy.clock.train_exp_counter = 2
    assert not vit.statistics_pass_once(strategy)
    assert fed == [0, 0, 1, 1] and ends == ["batches", "batches"]


def test_a_plugin_states_its_checkpoint_contract():
    class Counter(CheckpointablePlugin):
        checkpoint_key = "counter"

        def __init__(self):
            self.history = []

        def state_dict(self):
            return {}

        def load_state_dict(self, tensors, history, strategy):
            self.history = history

    plugin = Counter()
    assert plugin.scalars() == {} and plugin.results() == {}
    with pytest.raises(TypeError):

        class Incomplete(CheckpointablePlugin):
            checkpoint_key = "x"

        Incomplete()
