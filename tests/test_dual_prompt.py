"""DualPrompt: prefix-tuned attention, a G-prompt and an E-prompt per experience."""

from __future__ import annotations

import pytest
import torch
from _helpers import key_loss_steps, make_vit

from cl_hres.errors import ConfigError
from cl_hres.nn.config import DualPromptConfig
from cl_hres.nn.dual_prompt import DualPromptViT
from cl_hres.nn.prompt_query import PrefixAttention


def _model(width: int = 48, **config) -> DualPromptViT:
    cfg = DualPromptConfig(g_blocks=(0,), e_blocks=(1,), g_length=2, e_length=3, **config)
    vit = make_vit(embed_dim=width, num_heads=4)
    return DualPromptViT(vit, method="dualprompt", method_config=cfg, expert_per_experience=False)


def test_prefix_attention_is_attention_over_extra_keys_and_values():
    """Prefix keys/values made from real tokens z: the queries of x attend exactly as in
    the wrapped attention run on [z; x] (prefix-tuning's definition)."""
    model = _model().eval()
    attn = model.backbone.blocks[0].attn
    assert isinstance(attn, PrefixAttention)
    base = attn.base_layer
    x, z = torch.randn(2, 5, 48), torch.randn(2, 3, 48)
    with torch.no_grad():
        _, k, v = base.qkv(z).chunk(3, dim=-1)
        attn.prefix = (k, v)
        prefixed = attn(x)
        attn.prefix = None
        reference = base(torch.cat([z, x], dim=1))[:, 3:]
        torch.testing.assert_close(prefixed, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x), base(x))  # no prefix: the wrapped attention


def test_training_uses_the_current_e_prompt_and_testing_the_best_key():
    model = _model()
    x = torch.rand(4, 1, 8, 8)
    for t in range(2):
        model.begin_experience([([2 * t, 2 * t + 1], [0])])
    pool = model.pool
    model.train()
    with torch.no_grad():
        base = model.backbone_features(x)
        pool.e[0] += 1.0  # experience 0's E-prompt is not the one training now
        torch.testing.assert_close(model.backbone_features(x), base)
    assert model.auxiliary_loss() is not None and model.auxiliary_loss() is None  # read once
    model.eval()
    with torch.no_grad(), model.experts_disabled():
        query = model.backbone_features(x)
    with torch.no_grad():
        pool.keys[0] = query.mean(0)
        pool.keys[1] = -query.mean(0)
        chosen, _ = pool.choose(query, 2)
        assert chosen.tolist() == [0, 0, 0, 0]
        before = model.backbone_features(x)
        pool.e[1] += 1.0  # the unchosen E-prompt changes nothing at test time
        torch.testing.assert_close(model.backbone_features(x), before)
        pool.e[0] += 1.0
        assert not torch.allclose(model.backbone_features(x), before)


def test_key_loss_pulls_the_current_key_and_the_pool_bounds_the_stream():
    model = _model(pool_size=2, key_loss_weight=1.0)
    model.begin_experience([([0, 1], [0])])
    model.train()
    x = torch.rand(6, 1, 8, 8)
    losses = key_loss_steps(model, x)
    assert losses[2] < losses[0]
    model.begin_experience([([2, 3], [0])])
    with pytest.raises(ConfigError, match="2 E-prompts"):
        model.begin_experience([([4, 5], [0])])
    with pytest.raises(ConfigError, match="must not share a block"):
        DualPromptConfig(g_blocks=(0, 1), e_blocks=(1, 2))


def test_a_stream_longer_than_the_pool_is_refused_before_training(tmp_path, capsys):
    from cl_hres.cli.app import main

    out = tmp_path / "out"
    for option in ("--dualprompt-pool-size", "--coda-prompt-tasks"):
        strategy = "dualprompt" if "dual" in option else "coda-prompt"
        argv = ["run", "--strategy", strategy, option, "2", "--experiences", "3"]
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("cl-hres: error:") and "room for 2 experiences" in err[-1]
        assert not out.exists()
