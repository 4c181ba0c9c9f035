"""H-Res experts: zero-init exactness, fusion, freezing, any ViT layout."""

import pytest
import torch
from _helpers import make_vit

from cl_hres import ContinualViT, HResConfig
from cl_hres.errors import ConfigError


def _features(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"class_token": False, "global_pool": "avg"},
        {"reg_tokens": 2},
        {"img_size": 12, "patch_size": 3, "depth": 3, "embed_dim": 48, "num_heads": 3},
    ],
)
def test_fresh_expert_is_bit_identical_to_frozen_model(overrides):
    frozen = make_vit(**overrides)
    model = ContinualViT(make_vit(**overrides), method="hres", num_classes=3)
    model.begin_experience([([0, 1, 2], [0])])
    size = frozen.patch_embed.img_size[0]
    x = torch.randn(5, 1, size, size)
    assert model.banks and all(b.num_experts == 1 for b in model.banks)
    assert torch.equal(model.features(x), _features(frozen, x))


def test_experts_freeze_and_backbone_is_untouched_by_training():
    model = ContinualViT(make_vit(), method="hres", num_classes=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "bank" not in k}
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    for exp, classes in enumerate(([0, 1], [2, 3])):
        model.begin_experience([(classes, [0])])
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y + 2 * exp).backward()
            opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    bank = model.banks[0]
    assert [m.weight.requires_grad for m in bank.down.values()] == [False, True]
    # The first expert learned something (its up-projection left zero).
    assert bank.up["expert0"].weight.abs().sum() > 0


def test_fused_experts_equal_per_expert_loop():
    model = ContinualViT(make_vit(), method="hres", num_classes=2)
    for _ in range(3):
        model.begin_experience([([0, 1], [0])])
        for bank in model.banks:
            for up in bank.up.values():
                torch.nn.init.normal_(up.weight)
    x = torch.randn(3, 5, 32)
    for bank in model.banks:
        assert bank.num_experts == 3
        # H(x) = λ · Σ_k W_up,k · GELU(W_down,k · x), written out in float64 per expert.
        expected = torch.zeros(3, 5, 32, dtype=torch.float64)
        for name in ("expert0", "expert1", "expert2"):
            down = bank.down[name].weight.double()
            up = bank.up[name].weight.double()
            expected += torch.nn.functional.gelu(x.double() @ down.T) @ up.T
        expected *= bank.scale
        # Outputs of order 10 (three rank-64 experts, unit-normal up weights): float32
        # arithmetic differs from float64 by a few 1e-6.
        assert expected.abs().max() > 1
        torch.testing.assert_close(bank(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_dropout_is_off_in_training_mode():
    model = ContinualViT(make_vit(drop_rate=0.5), method="hres", num_classes=2)
    model.begin_experience([([0, 1], [0])])
    model.train()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model.features(x), model.features(x))


def test_block_selection_and_bad_configs():
    model = ContinualViT(make_vit(), method="hres", method_config=HResConfig(rank=4, blocks=(-1,)))
    assert len(model.banks) == 1 and model.banks[0].rank == 4
    with pytest.raises(ConfigError, match="out of range"):
        ContinualViT(make_vit(), method="hres", method_config=HResConfig(blocks=(5,)))
    for bad in ({"rank": 0}, {"scale": float("nan")}, {"blocks": ()}):
        with pytest.raises(ConfigError):
            HResConfig(**bad)
    with pytest.raises(ConfigError, match="unknown method"):
        ContinualViT(make_vit(), method="prompt")


@pytest.mark.parametrize("method", ["hres", "lora"])
def test_new_experts_take_the_wrapped_layers_dtype(method):
    model = ContinualViT(make_vit().to(torch.bfloat16), method=method, num_classes=2)
    model.begin_experience([([0, 1], [0])])
    dtypes = {p.dtype for b in model.banks for p in b.parameters()}
    assert dtypes == {torch.bfloat16}
    x = torch.randn(3, 1, 8, 8)  # float32 images: cast to the backbone's dtype
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0])).backward()
    # Moving or casting the model moves the (still empty) banks' reference along.
    model.to(torch.float32)
    model.begin_experience([([0, 1], [0])])
    assert {b.down["expert1"].weight.dtype for b in model.banks} == {torch.float32}


@pytest.mark.parametrize("read", ["block", "norm"])
def test_experts_read_the_block_input_or_its_norm(read):
    model = ContinualViT(make_vit(), method="hres", method_config=HResConfig(input=read))
    model.begin_experience([([0, 1], [0])])
    block = model.backbone.blocks[0]
    seen = {}
    block.bank.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    block.base_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    model.eval()(torch.randn(2, 1, 8, 8))
    expected = seen["z"] if read == "block" else block.base_layer.norm1(seen["z"])
    assert torch.equal(seen["x"], expected)
    with pytest.raises(ConfigError, match="hres input"):
        HResConfig(input="mlp")
