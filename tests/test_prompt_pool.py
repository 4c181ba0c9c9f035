"""L2P: a prompt pool on any ViT width, prompts chosen by key matching."""

from __future__ import annotations

import pytest
import torch
from _helpers import key_loss_steps, make_vit

from cl_hres.errors import ConfigError
from cl_hres.nn.config import L2PConfig
from cl_hres.nn.prompt_pool import PromptPool, PromptPoolViT


def _model(width: int = 48, **config) -> PromptPoolViT:
    cfg = L2PConfig(pool_size=6, length=2, top_k=2, **config)
    vit = make_vit(embed_dim=width)
    return PromptPoolViT(vit, method="l2p", method_config=cfg, expert_per_experience=False).eval()


@pytest.mark.parametrize("width", [32, 48])
def test_pool_has_the_vits_width_and_restores_the_token_layout(width):
    model = _model(width)
    pool = model.pool
    assert pool.prompts.shape == (6, 2, width) and pool.keys.shape == (6, width)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        prompted = model.backbone_features(x)
        with model.experts_disabled():
            plain = model.backbone_features(x)
        tokens = model.backbone.forward_features(x)
    assert prompted.shape == plain.shape == (3, width)
    assert tokens.shape[1] == 1 + 4  # cls + patches: the prompts were stripped
    assert not torch.allclose(prompted, plain)
    # Switched off, it is the pretrained backbone.
    fresh = make_vit(embed_dim=width).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain, fresh.forward_head(fresh.forward_features(x), True))


def test_prompts_are_chosen_by_the_pretrained_query():
    """Key j set to image i's query: image i selects prompt j, whatever the others."""
    model = _model()
    pool = model.pool
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad(), model.experts_disabled():
        query = model.backbone_features(x)
        pool.keys[4] = query[0]
        pool.keys[1] = query[1]
    idx, _ = pool.select(query)
    assert 4 in idx[0].tolist() and 1 in idx[1].tolist()
    # The forward uses those prompts: changing an unchosen prompt changes nothing.
    with torch.no_grad():
        before = model.backbone_features(x)
        unused = sorted(set(range(6)) - set(idx.flatten().tolist()))
        pool.prompts[unused] += 1.0
        torch.testing.assert_close(model.backbone_features(x), before)
        pool.prompts[idx[0, 0]] += 1.0
        assert not torch.allclose(model.backbone_features(x)[0], before[0])


def test_key_loss_pulls_the_chosen_keys_to_their_queries_and_reaches_the_strategy_loss():
    from cl_hres.avalanche.strategies import L2P

    model = _model(key_loss_weight=1.0)
    x = torch.rand(8, 1, 8, 8)
    losses = key_loss_steps(model, x)
    assert losses[2] < losses[0]
    strategy = L2P(model=model, train_mb_size=8, evaluator=None)
    strategy.is_training = True
    strategy.mb_output, strategy.mbatch = torch.zeros(8, 2), [x, torch.zeros(8, dtype=torch.long)]
    model._extra_loss = torch.tensor(100.0)  # as a forward leaves it
    assert float(strategy.criterion()) == pytest.approx(100.0 + torch.log(torch.tensor(2.0)).item())


def test_pool_state_round_trips_and_bad_config_is_one_line():
    model = _model()
    other = _model()
    other.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(other.backbone_features(x), model.backbone_features(x))
    with pytest.raises(ConfigError, match="top_k .* cannot exceed pool_size"):
        L2PConfig(pool_size=2, top_k=3)
    assert isinstance(model.backbone.blocks[0], PromptPool)
