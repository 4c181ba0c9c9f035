"""CODA-Prompt: query-weighted components, new orthogonal ones per experience."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_vit

from cl_hres.errors import ConfigError
from cl_hres.nn.coda_prompt import CodaPromptViT, orthogonal_rows
from cl_hres.nn.config import CodaPromptConfig


def _model(**config) -> CodaPromptViT:
    cfg = CodaPromptConfig(pool_size=6, length=2, blocks=(0, 1), tasks=3, **config)
    vit = make_vit(embed_dim=48, num_heads=4)
    return CodaPromptViT(vit, method="coda-prompt", method_config=cfg, expert_per_experience=False)


def test_orthogonal_rows_are_orthogonal_to_old_and_keep_their_norms():
    old, new = torch.randn(3, 10), torch.randn(2, 10) * 4
    made = orthogonal_rows(old, new)
    assert torch.allclose(made @ old.T, torch.zeros(2, 3), atol=1e-5)
    gram = made @ made.T
    assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros(2, 2), atol=1e-4)
    assert torch.allclose(made.norm(dim=1), new.norm(dim=1), atol=1e-5)
    assert orthogonal_rows(torch.randn(9, 10), new) is new  # no room: left as it is


def test_prompt_is_the_query_weighted_sum_and_old_components_stay_frozen():
    model = _model()
    model.begin_experience([([0, 1], [0])])
    model.begin_experience([([2, 3], [0])])  # experience 1: components 2-3 are its own
    pool = model.pool
    keys = pool.keys.detach().reshape(2, 6, -1)
    assert torch.allclose(
        keys[:, 2:4] @ keys[:, :2].transpose(1, 2), torch.zeros(2, 2, 2), atol=1e-4
    )
    q = torch.randn(3, 48)
    prompts = pool.prompts(q, 1)
    b = 0  # block 0, by hand
    alpha = torch.stack(
        [
            torch.nn.functional.cosine_similarity(q * pool.attention[b, m], pool.keys[b, m][None])
            for m in range(4)
        ],
        dim=1,
    )
    manual = torch.einsum("bm,mld->bld", alpha, pool.components[b, :4])
    torch.testing.assert_close(prompts[b], manual, rtol=1e-4, atol=1e-5)
    prompts.sum().backward()
    grad = pool.components.grad
    assert grad[:, :2].abs().sum() == 0 and grad[:, 2:4].abs().sum() > 0
    assert grad[:, 4:].abs().sum() == 0  # a later experience's components are unused


def test_prompts_change_the_features_and_the_penalty_reaches_the_loss():
    model = _model(ortho_weight=0.5)
    model.begin_experience([([0, 1], [0])])
    x = torch.rand(2, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        prompted = model.backbone_features(x)
        with model.experts_disabled():
            plain = model.backbone_features(x)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)
    assert model.auxiliary_loss() is None  # evaluation adds nothing
    model.train()
    model.backbone_features(x)
    penalty = model.auxiliary_loss()
    assert penalty is not None and float(penalty) > 0
    model.begin_experience([([2, 3], [0])])
    model.begin_experience([([4, 5], [0])])
    with pytest.raises(ConfigError, match="over 3 experiences"):
        model.begin_experience([([6, 7], [0])])
    with pytest.raises(ConfigError, match="length must be even"):
        CodaPromptConfig(length=3)
