import pytest
import torch

from mtl.heads import HEADS


@pytest.mark.parametrize("name", [n for n in HEADS.names() if not HEADS.get(n).per_pixel])
@pytest.mark.parametrize("in_shape", [(16,), (8, 4, 4)], ids=["vector", "feature_map"])
@pytest.mark.parametrize("num_outputs", [1, 5])
def test_every_head_forward_backward(name, in_shape, num_outputs):
    head = HEADS.get(name)(in_shape, num_outputs)
    x = torch.randn(3, *in_shape, requires_grad=True)
    out = head(x)
    expected = (3,) if name == "regression" and num_outputs == 1 else (3, num_outputs)
    assert out.shape == expected
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("name", [n for n in HEADS.names() if HEADS.get(n).per_pixel])
@pytest.mark.parametrize("num_outputs", [1, 5])
def test_every_per_pixel_head_forward_backward(name, num_outputs):
    head = HEADS.get(name)((8, 4, 4), num_outputs, out_size=[16, 12])
    x = torch.randn(3, 8, 4, 4, requires_grad=True)
    out = head(x)
    assert out.shape == (3, num_outputs, 16, 12)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="feature maps"):
        HEADS.get(name)((16,), num_outputs, out_size=[16, 12])


def test_feature_maps_are_average_pooled():
    head = HEADS.get("linear")((2, 3, 3), 1)
    x = torch.randn(4, 2, 3, 3)
    expected = head.fc(x.mean(dim=(2, 3)))
    assert torch.allclose(head(x), expected)


def test_mlp_head_layers():
    head = HEADS.get("mlp")((50,), 10, hidden=[50])
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(50, 50), (50, 10)]


def test_zero_outputs_is_rejected():
    with pytest.raises(ValueError, match="num_outputs >= 1"):
        HEADS.get("linear")((4,), 0)


def test_fused_linear_heads_match_separate_heads_in_outputs_and_gradients():
    from mtl.model import MultiTaskModel
    from mtl.trunks import TRUNKS

    torch.manual_seed(0)
    heads = {f"t{i}": HEADS.get("linear")((50,), 10) for i in range(3)}
    heads["reg"] = HEADS.get("regression")((50,), 1)  # not fusable: runs on its own
    model = MultiTaskModel(TRUNKS.get("seed_net")(dropout=0.0), heads)
    x = torch.randn(4, 1, 28, 28)
    fused = model(x)
    sum(o.square().sum() for o in fused.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    features = model.trunk(x)
    separate = {t: model.heads[t](features) for t in heads}
    sum(o.square().sum() for o in separate.values()).backward()
    for t in heads:
        assert torch.allclose(fused[t], separate[t], atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    assert {k for k in model.state_dict() if k.startswith("heads.t0.")} == {"heads.t0.fc.weight", "heads.t0.fc.bias"}


def test_dense_head_on_a_trunk_other_than_a_resnet():
    """The dense head reads any image trunk's last map (pool=false): MobileNetV3's [576, 1, 1]
    for 32x32 inputs, upsampled to the task's size."""
    from mtl.trunks import build_trunk

    trunk = build_trunk({"name": "mobilenet_v3_small", "pool": False}).eval()
    shape = trunk.feature_shape((3, 32, 32))
    assert shape == (trunk.feature_info[-1]["num_chs"], 1, 1) == (576, 1, 1)
    head = HEADS.get("dense")(shape, 3, out_size=[32, 32])
    assert head(trunk(torch.randn(2, 3, 32, 32))).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"set trunk\.pool=false on an image trunk"):
        HEADS.get("dense")(build_trunk({"name": "mobilenet_v3_small"}).feature_shape((3, 32, 32)), 3, out_size=[32, 32])
