import pytest
import torch
import torch.nn as nn

from fedkernels.errors import NonFiniteError, RankError, ShapeError
from fedkernels.nn import LoRALinear
from fedkernels.reference import lora_linear_ref


def make_layer(r=8, fin=13, fout=11, **kw):
    layer = LoRALinear(nn.Linear(fin, fout), r=r, alpha=2 * r, **kw)
    nn.init.normal_(layer.lora_B)  # peft init makes B zero; random B exercises the adapter path
    return layer


def test_init_is_peft_like_and_noop():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, r=4, alpha=8)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), base(x))
    assert not base.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scale == 2.0
    assert LoRALinear(nn.Linear(10, 6), r=4, alpha=8, use_rslora=True).scale == 4.0


def test_forward_matches_reference_with_active_rank_and_mask():
    layer = make_layer()
    x = torch.randn(2, 5, 13)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    layer.set_active_rank(3)
    m = torch.tensor([1.0] * 3 + [0.0] * 5)
    torch.testing.assert_close(layer(x), lora_linear_ref(x, w, b, layer.lora_A, layer.lora_B, layer.scale, m))
    mask = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1.0])
    layer.set_rank_mask(mask)
    torch.testing.assert_close(layer(x), lora_linear_ref(x, w, b, layer.lora_A, layer.lora_B, layer.scale, mask))
    layer(x).sum().backward()
    assert torch.all(layer.lora_A.grad[mask == 0] == 0) and torch.all(layer.lora_B.grad[:, mask == 0] == 0)
    layer.set_active_rank(0)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_trainable_switch_freezes_without_removing():
    layer = make_layer()
    layer.trainable = False
    x = torch.randn(4, 13, requires_grad=True)
    y = layer(x)
    assert y.requires_grad
    y.sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and x.grad is not None
    assert "trainable=False" in repr(layer)


def test_dropout_only_in_training_and_reproducible():
    layer = make_layer(dropout=0.5)
    x = torch.randn(6, 13)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # a fresh mask each call
    layer.eval()
    ref = lora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(layer(x), ref)


def test_merge_unmerge_and_nan_refusal():
    layer = make_layer()
    x = torch.randn(3, 13)
    y = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0)
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    w1 = layer.base_layer.weight.clone()
    with pytest.raises(NonFiniteError, match="merge refused"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w1) and not layer.merged


def test_bad_input_errors_name_the_value():
    layer = make_layer(r=4)
    with pytest.raises(RankError, match="got 5"):
        layer.set_active_rank(5)
    with pytest.raises(ShapeError, match=r"\(3,\)"):
        layer.set_rank_mask(torch.ones(3))
    with pytest.raises(RankError, match="got 0"):
        LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1), r=2)
    with pytest.raises(ShapeError, match="7 features"):
        layer(torch.randn(2, 7))


def test_extra_repr():
    r = repr(make_layer(r=4, dropout=0.1))
    expected = ("in_features=13", "out_features=11", "r=4", "active_rank=4", "alpha=8", "dropout=0.1", "trainable=True")
    for part in expected:
        assert part in r
