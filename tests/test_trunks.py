"""Trunks: the contract every registered trunk meets, pretrained weights, checkpoint loading."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from torch import nn

from mtl.registry import ComponentError
from mtl.trunks import TRUNKS, build_trunk, load_trunk_checkpoint

TIMM_MODEL = "resnet10t"  # small, and in timm for years

# Per registered trunk: (config kwargs, one input's shape). Small inputs keep the file fast;
# a few entries switch on an option (small_input, in_channels) so its path runs too.
SPECS: dict[str, tuple[dict, tuple[int, ...]]] = {
    "seed_net": ({}, (1, 28, 28)),
    "efficientnet_lite0": ({"image_size": 32}, (1, 28, 28)),
    "multi_lenet": ({}, (1, 28, 28)),
    "mlp": ({"in_features": 8}, (8,)),
    "resnet18": ({"small_input": True}, (3, 32, 32)),
    "resnet34": ({}, (3, 32, 32)),
    "resnet50": ({"in_channels": 2}, (2, 32, 32)),
    "mobilenet_v3_small": ({}, (3, 32, 32)),
    "mobilenet_v3_large": ({"in_channels": 1}, (1, 32, 32)),
    "efficientnet_b0": ({}, (3, 32, 32)),
    "timm": ({"model_name": TIMM_MODEL}, (3, 32, 32)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def first_call_order(trunk: nn.Module, groups: list[tuple[str, nn.Module]], x: torch.Tensor) -> list[int]:
    """Indices of ``groups`` in the order the forward pass first reaches each."""
    order: list[int] = []

    def hook(index: int):
        return lambda *_: None if index in order else order.append(index)

    handles = [m.register_forward_pre_hook(hook(i)) for i, (_, g) in enumerate(groups) for m in g.modules()]
    try:
        trunk(x)
    finally:
        for h in handles:
            h.remove()
    return order


@pytest.mark.parametrize("name", TRUNKS.names())
def test_trunk_contract(name: str) -> None:
    if getattr(TRUNKS.get(name), "takes_text", False):
        pytest.skip("a text trunk takes UTF-8 rows, not tensors of a shape: tests/test_pretrained_trunks.py")
    if name not in SPECS:
        pytest.fail(f"trunk {name!r} has no entry in SPECS in tests/test_trunks.py: add kwargs and an input shape")
    kwargs, input_shape = SPECS[name]
    torch.manual_seed(0)
    trunk = build_trunk({"name": name, **kwargs})
    feature_shape = trunk.feature_shape(input_shape)
    x = torch.randn(2, *input_shape)

    out = trunk(x)
    assert out.shape == (2, *feature_shape)
    out.sum().backward()
    no_grad = [n for n, p in trunk.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"

    groups = trunk.layer_groups()
    assert groups, "layer_groups() is empty"
    names = [group_name for group_name, _ in groups]
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names), names
    own = {id(p) for p in trunk.parameters()}
    seen: set[int] = set()
    for group_name, group in groups:
        ids = [id(p) for p in group.parameters()]
        assert ids, f"group {group_name!r} has no parameters"
        assert set(ids) <= own, f"group {group_name!r} holds parameters that are not the trunk's"
        assert not seen & set(ids), f"group {group_name!r} shares parameters with an earlier group"
        seen |= set(ids)
    assert seen == own, "layer groups leave some trunk parameters out"
    assert first_call_order(trunk, groups, x) == list(range(len(groups))), f"groups not in forward order: {names}"


# Valid 5x5 convolutions make LeNet's maps smaller than input / reduction; by hand, for 28x28:
# 28 -conv-> 24 -pool-> 12, 12 -conv-> 8 -pool-> 4.
LENET_SIZES = [(12, 12), (4, 4)]


def stage_sizes(trunk, name: str, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each stage's spatial size from feature_info: ceil(input / reduction), as strided
    convolutions and pools with "same" padding give (() for stages without spatial dims)."""
    if name in ("seed_net", "multi_lenet"):
        return LENET_SIZES
    # efficientnet_lite0 resizes its inputs to image_size before the network.
    size = (trunk.image_size,) * 2 if name == "efficientnet_lite0" else input_shape[1:]
    return [() if d["reduction"] is None else tuple(-(-s // d["reduction"]) for s in size) for d in trunk.feature_info]


@pytest.mark.parametrize("name", TRUNKS.names())
def test_trunk_stages_match_their_feature_info(name: str) -> None:
    if getattr(TRUNKS.get(name), "takes_text", False):
        pytest.skip("a text trunk takes UTF-8 rows, not tensors of a shape: tests/test_pretrained_trunks.py")
    kwargs, input_shape = SPECS[name]
    torch.manual_seed(0)
    trunk = build_trunk({"name": name, **kwargs}).eval()
    x = torch.randn(2, *input_shape)
    info = trunk.feature_info
    assert info and all(set(d) >= {"module", "num_chs", "reduction"} for d in info), info
    for d in info:
        trunk.get_submodule(d["module"])  # names a module of the trunk
    final, stages = trunk.forward_intermediates(x)
    assert [tuple(t.shape) for t in stages] == [(2, d["num_chs"], *hw) for d, hw in zip(info, stage_sizes(trunk, name, input_shape))]
    # forward = forward_head(forward_features), and the final features are forward_features'.
    assert torch.equal(final, trunk.forward_features(x))
    assert torch.equal(trunk(x), trunk.forward_head(final))
    # timm's indices: the last n, listed ones (negative from the end), intermediates only.
    last = trunk.forward_intermediates(x, indices=1)[1]
    assert len(last) == 1 and torch.equal(last[0], stages[-1])
    picked = trunk.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
    assert len(picked) == 2 and torch.equal(picked[0], stages[0]) and torch.equal(picked[1], stages[-1])
    with pytest.raises(ValueError, match=rf"indices={len(info) + 1}: the last n stages, with n from 1 to {len(info)}"):
        trunk.forward_intermediates(x, indices=len(info) + 1)
    with pytest.raises(ValueError, match=rf"stage indices from {-len(info)} to {len(info) - 1}"):
        trunk.forward_intermediates(x, indices=[len(info)])


@pytest.mark.parametrize("name", [n for n in TRUNKS.names() if n in ("resnet18", "mobilenet_v3_small", "efficientnet_lite0", "timm")])
def test_pool_false_keeps_the_last_feature_map(name: str) -> None:
    kwargs, input_shape = SPECS[name]
    trunk = build_trunk({"name": name, **kwargs, "pool": False}).eval()
    x = torch.randn(2, *input_shape)
    maps = trunk(x)
    assert maps.dim() == 4 and trunk.feature_shape(input_shape) == tuple(maps.shape[1:])
    assert torch.equal(maps, trunk.forward_features(x))
    trunk.pool = True  # the same weights pooled: the mean of this map
    assert torch.allclose(trunk(x), maps.mean(dim=(2, 3)), atol=1e-6)


def test_unknown_trunk_argument_names_the_key() -> None:
    with pytest.raises(ComponentError, match="trunk.pretrained"):
        build_trunk({"name": "resnet18", "pretrained": True})


# --- torchvision weights through the torch hub cache ---------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; downloads fail as they would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME

    def offline(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path


def write_torchvision_weights(arch: str) -> dict[str, torch.Tensor]:
    """A seeded torchvision model's state dict (classifier included) where torchvision caches it."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize(("arch", "classifier"), [("resnet18", "fc."), ("mobilenet_v3_small", "classifier.")])
def test_torchvision_weights_load_from_hub_cache(torch_home, arch: str, classifier: str) -> None:
    written = write_torchvision_weights(arch)
    trunk = build_trunk({"name": arch, "weights": "IMAGENET1K_V1", "download": False})
    got = trunk.state_dict()
    assert set(got) == {k for k in written if not k.startswith(classifier)}
    for key, value in got.items():
        assert torch.equal(value, written[key]), key
    assert trunk.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert build_trunk({"name": arch}).pretrained_cfg is None


def test_torchvision_default_weights_name_resolves(torch_home) -> None:
    write_torchvision_weights("resnet18")
    trunk = build_trunk({"name": "resnet18", "weights": "DEFAULT"})
    assert trunk.pretrained_cfg["weights"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_torchvision_download_fills_the_hub_cache(torch_home, monkeypatch) -> None:
    torch.manual_seed(1)
    written = torchvision.models.resnet18().state_dict()
    urls = []

    def download(url, dst, *args, **kwargs):
        urls.append(url)
        torch.save(written, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    trunk = build_trunk({"name": "resnet18", "weights": "IMAGENET1K_V1"})
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(trunk.conv1.weight, written["conv1.weight"])
    assert os.path.isfile(trunk.pretrained_cfg["file"])


@pytest.mark.parametrize("download", [False, True])
def test_torchvision_missing_weights_name_the_path(torch_home, download: bool) -> None:
    expected = os.path.join(str(torch_home), "hub", "checkpoints", "resnet18-f37072fd.pth")
    with pytest.raises(ComponentError) as err:
        build_trunk({"name": "resnet18", "weights": "IMAGENET1K_V1", "download": download})
    assert expected in str(err.value) and "trunk.checkpoint" in str(err.value)


def test_torchvision_unknown_weights_name_lists_valid_ones(torch_home) -> None:
    with pytest.raises(ComponentError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_trunk({"name": "resnet50", "weights": "IMAGENET"})


def test_torchvision_weights_adapted_to_one_channel(torch_home) -> None:
    written = write_torchvision_weights("resnet18")
    trunk = build_trunk({"name": "resnet18", "weights": "IMAGENET1K_V1", "in_channels": 1})
    assert torch.allclose(trunk.conv1.weight, written["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(trunk.layer1[0].conv1.weight, written["layer1.0.conv1.weight"])
    assert len(trunk.pretrained_cfg["mean"]) == 1
    assert trunk(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_torchvision_weights_adapted_to_five_channels(torch_home) -> None:
    written = write_torchvision_weights("mobilenet_v3_small")
    trunk = build_trunk({"name": "mobilenet_v3_small", "weights": "IMAGENET1K_V1", "in_channels": 5})
    rgb = written["features.0.0.weight"]
    expected = torch.cat([rgb, rgb[:, :2]], dim=1) * 3 / 5
    assert torch.allclose(trunk.features[0][0].weight, expected)


def test_small_input_keeps_its_own_conv1_and_warns(torch_home) -> None:
    written = write_torchvision_weights("resnet18")
    with pytest.warns(UserWarning, match="conv1.weight"):
        trunk = build_trunk({"name": "resnet18", "weights": "IMAGENET1K_V1", "small_input": True})
    assert trunk.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(trunk.bn1.weight, written["bn1.weight"])


# --- timm ----------------------------------------------------------------------------------------


def test_timm_pretrained_file_loads(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    written = timm.create_model(TIMM_MODEL).state_dict()  # with its 1000-class fc
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": written}, path)
    trunk = build_trunk({"name": "timm", "model_name": TIMM_MODEL, "pretrained_file": str(path)})
    got = trunk.model.state_dict()
    assert set(got) == {k for k in written if not k.startswith("fc.")}
    for key, value in got.items():
        assert torch.equal(value, written[key]), key
    assert trunk.pretrained_cfg["file"] == str(path)


def test_timm_pretrained_file_of_another_model_names_the_key(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    expected = r"trunk.pretrained_file.*another architecture.*layer2\.0\.downsample\.1\.weight: checkpoint"
    with pytest.raises(ComponentError, match=expected):
        build_trunk({"name": "timm", "model_name": TIMM_MODEL, "pretrained_file": str(path)})


def test_timm_pretrained_offline_says_to_pass_a_file(tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    # As on a machine without network: hub lookups go to an empty cache only.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ComponentError, match="trunk.pretrained_file=PATH"):
        build_trunk({"name": "timm", "model_name": TIMM_MODEL, "pretrained": True})


def test_timm_unknown_model_suggests_close_names() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ComponentError, match="resnet18"):
        build_trunk({"name": "timm", "model_name": "resnet181"})


# --- load_trunk_checkpoint ------------------------------------------------------------------------


def seed_net(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_trunk({"name": "seed_net", **kwargs})


def layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    head = {"heads.digit.weight": torch.zeros(10, 50)}
    return {
        "training": {"model": {**{f"trunk.{k}": v for k, v in state.items()}, **head}, "epoch": 3},
        "training_ddp": {"model": {f"module.trunk.{k}": v for k, v in state.items()}},
        "exported": {"trunk": state, "trunk_config": {"name": "seed_net"}},
        "state_dict": {"state_dict": state},
        "plain": state,
        "plain_ddp": {f"module.{k}": v for k, v in state.items()},
    }


@pytest.mark.parametrize("layout", list(layouts({})))
def test_checkpoint_layouts_round_trip(tmp_path, layout: str) -> None:
    source = seed_net(0)
    path = tmp_path / "ckpt.pt"
    torch.save(layouts(source.state_dict())[layout], path)
    target = seed_net(1)
    assert load_trunk_checkpoint(target, str(path)) is target
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_checkpoint_from_trunk_config(tmp_path) -> None:
    source = seed_net(0)
    path = tmp_path / "trunk.pt"
    torch.save({"trunk": source.state_dict()}, path)
    trunk = build_trunk({"name": "seed_net", "checkpoint": str(path)})
    assert torch.equal(trunk.fc.weight, source.fc.weight)


def test_checkpoint_shape_mismatch_names_key_and_shapes(tmp_path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(seed_net(0, features=64).state_dict(), path)
    with pytest.raises(ComponentError) as err:
        load_trunk_checkpoint(seed_net(1, features=50), str(path), where="trunk.checkpoint")
    message = str(err.value)
    for part in ("trunk.checkpoint", str(path), "SeedNet", "another architecture", "fc.weight", "(64, 320)"):
        assert part in message, part
    assert "fc.weight: checkpoint (64, 320) vs trunk (50, 320)" in message


def test_checkpoint_without_matching_keys_is_refused(tmp_path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(build_trunk({"name": "mlp", "in_features": 8}).state_dict(), path)
    with pytest.raises(ComponentError, match="no key of .* matches the configured trunk SeedNet"):
        load_trunk_checkpoint(seed_net(0), str(path))


def test_checkpoint_missing_file_names_where_and_path(tmp_path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(ComponentError, match=r"trunk\.checkpoint: file not found: " + re.escape(str(path))):
        build_trunk({"name": "seed_net", "checkpoint": str(path)})


class NotWeights:
    """An object that only a full (code-running) unpickle could restore."""


@pytest.mark.parametrize("content", ["garbage", "pickled_object"])
def test_checkpoint_unreadable_file_is_refused(tmp_path, content: str) -> None:
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"model": NotWeights()}, path)
    with pytest.raises(ComponentError, match=r"trunk\.checkpoint: cannot read " + re.escape(str(path))):
        load_trunk_checkpoint(seed_net(0), str(path))


def test_checkpoint_lacking_trunk_weights_is_refused(tmp_path) -> None:
    # A trunk left partly at its random init would silently change the experiment.
    state = seed_net(0).state_dict()
    del state["conv1.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ComponentError, match=r"trunk\.checkpoint: .*lacks 1 weights of the configured trunk .*conv1\.bias"):
        load_trunk_checkpoint(seed_net(1), str(path))


def test_checkpoint_extra_keys_warn(tmp_path) -> None:
    state = seed_net(0).state_dict()
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    target = seed_net(1)
    with pytest.warns(UserWarning, match=r"1 keys of .* are not used by .*extra\.weight"):
        load_trunk_checkpoint(target, str(path))
    assert torch.equal(target.fc.weight, state["fc.weight"])
