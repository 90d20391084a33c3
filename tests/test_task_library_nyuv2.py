"""NYUv2 tasks on a tiny tree in MTAN's .npy layout, the dense metrics and losses by hand,
the dense head, ResNet feature maps (pool=false) and the shipped configs/nyuv2.yaml."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mtl import dense
from mtl.builders import build_components
from mtl.config import ConfigError, load_config, resolve
from mtl.heads import HEADS
from mtl.model import MultiTaskModel
from mtl.results import evaluate
from mtl.task import TASKS
from mtl.trunks import TRUNKS, build_trunk
from tasks.nyuv2 import IMAGENET_MEAN, IMAGENET_STD, NYUv2Depth, NYUv2Normal, NYUv2Semantic

from conftest import ROOT

H, W = 8, 12
N_TRAIN, N_TEST = 6, 3
TASK_CLASSES = {"nyuv2_semantic": NYUv2Semantic, "nyuv2_depth": NYUv2Depth, "nyuv2_normal": NYUv2Normal}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tree(root: Path) -> Path:
    """MTAN's layout with N_TRAIN + N_TEST scenes of H x W: labels with -1 pixels, depth and
    normals with invalid (zero) pixels, as in the real release."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", N_TEST)):
        for field in ("image", "label", "depth", "normal"):
            (root / split / field).mkdir(parents=True)
        for i in range(n):
            label = rng.integers(-1, 13, size=(H, W)).astype(np.float32)
            depth = rng.uniform(0.5, 10, size=(H, W, 1)).astype(np.float32)
            depth[0, :3] = 0
            normal = rng.normal(size=(H, W, 3))
            normal = (normal / np.linalg.norm(normal, axis=2, keepdims=True)).astype(np.float32)
            normal[-1, -2:] = 0
            arrays = {"image": rng.random((H, W, 3), dtype=np.float32), "label": label, "depth": depth, "normal": normal}
            for field, array in arrays.items():
                np.save(root / split / field / f"{i}.npy", array)
    return root


@pytest.fixture
def nyu_root(tmp_path):
    return write_tree(tmp_path / "nyuv2")


def build(name: str, root: Path, **kwargs):
    task = TASKS.get(name)(root=str(root), size=(H, W), **kwargs)
    task.name = name
    return task


def batch(ds, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# --- the tasks on a tiny tree ----------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_CLASSES)
def test_tiny_tree_feeds_the_dense_head_loss_and_metrics(nyu_root, name):
    assert TASKS.get(name) is TASK_CLASSES[name]
    task = build(name, nyu_root, val_fraction=0.34)
    splits = task.build_datasets()
    assert [len(ds) for _, ds in splits.items()] == [4, 2, N_TEST]
    x, y = batch(splits.train)
    assert x.shape == (4, 3, H, W) and x.dtype == torch.float32
    expected = {"nyuv2_semantic": (4, H, W), "nyuv2_depth": (4, 1, H, W), "nyuv2_normal": (4, 3, H, W)}[name]
    assert y.shape == expected
    assert task.valid_mask(y).all()

    head_node = task.head_config()
    head = HEADS.get(head_node.pop("name"))((5, 2, 3), task.num_outputs, **head_node)
    out = head(torch.randn(4, 5, 2, 3))
    assert out.shape == (4, task.num_outputs, H, W)
    loss = task.masked_loss(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    metrics = task.metrics()
    assert task.primary_metric in metrics
    for metric_name, metric in metrics.items():
        assert metric.higher_is_better is not None, metric_name
        metric.update(out.detach(), y)
        assert torch.isfinite(metric.compute()), metric_name


def test_targets_keep_their_values_and_images_are_normalised(nyu_root):
    x, y = NYUv2Semantic(root=str(nyu_root), size=(H, W)).build_datasets().test[1]
    image = torch.from_numpy(np.load(nyu_root / "val" / "image" / "1.npy")).permute(2, 0, 1)
    assert torch.allclose(x, (image - IMAGENET_MEAN) / IMAGENET_STD)
    label = torch.from_numpy(np.load(nyu_root / "val" / "label" / "1.npy"))
    assert y.dtype == torch.long and torch.equal(y, label.long())
    _, depth = NYUv2Depth(root=str(nyu_root), size=(H, W)).build_datasets().test[1]
    assert torch.equal(depth, torch.from_numpy(np.load(nyu_root / "val" / "depth" / "1.npy")).permute(2, 0, 1))


def test_resizing_is_nearest_for_targets(nyu_root):
    size = (4, 6)
    for cls in TASK_CLASSES.values():
        x, y = cls(root=str(nyu_root), size=size).build_datasets().test[0]
        assert x.shape == (3, *size) and y.shape[-2:] == size
    _, label = NYUv2Semantic(root=str(nyu_root), size=size).build_datasets().test[0]
    original = torch.from_numpy(np.load(nyu_root / "val" / "label" / "0.npy"))
    # Halving 8x12 by nearest-exact picks every other pixel, starting at the second.
    assert torch.equal(label, original[1::2, 1::2].long())
    _, normal = NYUv2Normal(root=str(nyu_root), size=size).build_datasets().test[0]
    norms = normal.norm(dim=0)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0)) and (norms == 0).any()  # unit or invalid, never blends


def test_splits_are_disjoint_stable_and_honour_train_fraction(nyu_root):
    task = NYUv2Depth(root=str(nyu_root), val_fraction=0.34, split_seed=3)
    splits = task.build_datasets()
    train, val, test = splits.train.indices, splits.val.indices, splits.test.indices
    assert sorted(train + val) == list(range(N_TRAIN)) and not set(train) & set(val)
    assert splits.train.folder == splits.val.folder == nyu_root / "train"
    assert splits.test.folder == nyu_root / "val" and test == list(range(N_TEST))
    again = NYUv2Depth(root=str(nyu_root), val_fraction=0.34, split_seed=3).build_datasets()
    assert (again.train.indices, again.val.indices) == (train, val)
    part = NYUv2Depth(root=str(nyu_root), val_fraction=0.34, split_seed=3, train_fraction=0.5).build_datasets()
    assert len(part.train) == 2 and set(part.train.indices) <= set(train) and part.val.indices == val


def test_the_three_tasks_share_inputs(nyu_root):
    tasks = [cls(root=str(nyu_root), size=(H, W), val_fraction=0.34) for cls in TASK_CLASSES.values()]
    assert len({t.input_key() for t in tasks}) == 1
    for split in ("train", "val", "test"):
        first, *rest = [getattr(t.build_datasets(), split) for t in tasks]
        for other in rest:
            assert other.indices == first.indices and torch.equal(other[0][0], first[0][0])
    assert NYUv2Depth(root=str(nyu_root), size=(H, W), val_fraction=0.34, split_seed=1).input_key() != tasks[0].input_key()
    assert NYUv2Depth(root=str(nyu_root), size=(4, 6), val_fraction=0.34).input_key() != tasks[0].input_key()


def test_missing_data_names_the_folder_and_how_to_get_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*lorenmt/mtan.*nyuv2.zip"):
        NYUv2Semantic(root=str(missing)).build_datasets()
    cfg = resolve({"output_dir": "x", "trunk": {"name": "seed_net"}, "tasks": {"seg": {"name": "nyuv2_semantic", "root": str(missing)}}})
    with pytest.raises(ConfigError, match=f"tasks.seg: cannot load its data: .*{missing}"):
        build_components(cfg)


def test_wrong_layout_names_the_missing_file_or_folder(nyu_root):
    os.remove(nyu_root / "train" / "depth" / "3.npy")
    with pytest.raises(FileNotFoundError, match=f"{nyu_root / 'train' / 'depth' / '3.npy'} not found"):
        NYUv2Depth(root=str(nyu_root)).build_datasets()
    NYUv2Semantic(root=str(nyu_root)).build_datasets()  # labels are all there
    for name in os.listdir(nyu_root / "val" / "normal"):
        os.remove(nyu_root / "val" / "normal" / name)
    os.rmdir(nyu_root / "val" / "normal")
    with pytest.raises(FileNotFoundError, match=f"folder {nyu_root / 'val' / 'normal'} not found"):
        NYUv2Normal(root=str(nyu_root)).build_datasets()


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="size must be"):
        NYUv2Depth(size=(288,))


def test_evaluate_runs_the_metrics_over_the_lazy_datasets(nyu_root):
    class Conv(TRUNKS.base):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    tasks = {n: build(n, nyu_root, val_fraction=0.34) for n in TASK_CLASSES}
    heads = {}
    for n, t in tasks.items():
        node = t.head_config()
        heads[n] = HEADS.get(node.pop("name"))((4, H // 2, W // 2), t.num_outputs, **node)
    model = MultiTaskModel(Conv(), heads)
    results = evaluate(model, tasks, {n: t.build_datasets().test for n, t in tasks.items()}, 2, torch.device("cpu"))
    for n, t in tasks.items():
        assert set(results[n]) == {*t.metrics(), "loss"}
        assert all(math.isfinite(v) for v in results[n].values()), results[n]


# --- metrics by hand ---------------------------------------------------------------------------


def one_hot_logits(pred: list[int], num_classes: int) -> torch.Tensor:
    """``[1, C, 1, len(pred)]`` logits whose argmax is ``pred``."""
    return torch.eye(num_classes)[pred].T.reshape(1, num_classes, 1, len(pred))


def test_miou_and_pixel_accuracy_by_hand():
    # class 0: TP 1, FN 1 -> IoU 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 appears nowhere and
    # class 3 only as a prediction on an unlabelled pixel: both left out of the mean.
    target = torch.tensor([[[0, 0, 1, 1, -1]]])
    logits = one_hot_logits([0, 1, 1, 1, 3], 4)
    miou, acc = dense.MeanIoU(4), dense.PixelAccuracy(4)
    for metric in (miou, acc):  # streamed in two updates, as over batches
        metric.update(logits[..., :2], target[..., :2])
        metric.update(logits[..., 2:], target[..., 2:])
    assert miou.compute().item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert acc.compute().item() == pytest.approx(3 / 4)
    assert miou.higher_is_better and acc.higher_is_better


def test_depth_errors_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0]).view(1, 1, 1, 4)
    depth = torch.tensor([2.0, 2.0, 0.0, 4.0]).view(1, 1, 1, 4)  # the 0 pixel has no measurement
    absolute, relative = dense.DepthError(), dense.DepthError(relative=True)
    absolute.update(pred, depth)
    relative.update(pred, depth)
    assert absolute.compute().item() == pytest.approx((1 + 0 + 1) / 3)
    assert relative.compute().item() == pytest.approx((1 / 2 + 0 + 1 / 4) / 3)
    assert absolute.higher_is_better is False and relative.higher_is_better is False


def normals_at(degrees: list[float], scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions at the given angles from the true normal (0, 0, 1), scaled (the metrics
    must not care about length), plus one pixel without a normal: ``[1, 3, 1, n + 1]``."""
    rad = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    pred = torch.stack([rad.sin(), torch.zeros_like(rad), rad.cos()]) * scale
    pred = torch.cat([pred, torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)], dim=1)
    true = torch.zeros_like(pred)
    true[2, :-1] = 1
    return pred.float()[None, :, None], true.float()[None, :, None]


def compute(metric, pred, true) -> float:
    metric.update(pred, true)
    return metric.compute().item()


def test_normal_angle_metrics_by_hand():
    pred, true = normals_at([0, 10, 20, 45, 90])
    assert torch.allclose(dense.angle_errors(pred, true), torch.tensor([0.0, 10, 20, 45, 90]), atol=1e-4)
    assert compute(dense.AngleMean(), pred, true) == pytest.approx(33, abs=1e-4)
    assert compute(dense.AngleMedian(), pred, true) == pytest.approx(20, abs=1e-3)
    assert compute(dense.AngleWithin(11.25), pred, true) == pytest.approx(2 / 5)
    assert compute(dense.AngleWithin(22.5), pred, true) == pytest.approx(3 / 5)
    assert compute(dense.AngleWithin(30.0), pred, true) == pytest.approx(3 / 5)
    # An even count takes the mean of the two middle angles, as numpy.median does.
    assert compute(dense.AngleMedian(), *normals_at([0, 10, 20, 45])) == pytest.approx(15, abs=1e-3)
    assert [m.higher_is_better for m in (dense.AngleMean(), dense.AngleMedian(), dense.AngleWithin(30))] == [False, False, True]


def test_angle_median_matches_numpy_over_many_batches():
    torch.manual_seed(0)
    median, angles = dense.AngleMedian(), []
    for _ in range(3):
        pred, true = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
        median.update(pred, true)
        angles.append(dense.angle_errors(pred, true))
    assert median.compute().item() == pytest.approx(np.median(torch.cat(angles).numpy()), abs=1e-3)


# --- losses and missing samples --------------------------------------------------------------


def test_semantic_loss_averages_labelled_pixels_per_sample():
    task = NYUv2Semantic()
    logits = torch.randn(2, 13, 1, 3)
    target = torch.tensor([[[4, -1, 7]], [[-1, -1, -1]]])  # the second sample has no labelled pixel
    ce = torch.nn.functional.cross_entropy(logits[0, :, 0].T, torch.tensor([4, 0, 7]), reduction="none")
    per_sample = task.loss(logits, target)
    assert per_sample.shape == (2,)
    assert per_sample[0].item() == pytest.approx((ce[0] + ce[2]).item() / 2)
    assert task.valid_mask(target).tolist() == [True, False]
    assert task.masked_loss(logits, target).item() == pytest.approx(per_sample[0].item())


def test_depth_loss_ignores_unmeasured_pixels():
    task = NYUv2Depth()
    pred = torch.tensor([[1.0, 2.0, 3.0, 5.0], [9.0, 9.0, 9.0, 9.0]]).view(2, 1, 1, 4)
    depth = torch.tensor([[2.0, 2.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 1, 4)
    assert task.loss(pred, depth).tolist() == pytest.approx([2 / 3, 0.0])
    assert task.valid_mask(depth).tolist() == [True, False]
    assert task.masked_loss(pred, depth).item() == pytest.approx(2 / 3)


def test_normal_loss_normalises_the_prediction_and_ignores_missing_normals():
    task = NYUv2Normal()
    pred, true = normals_at([45, 90], scale=5.0)  # and a pixel without a normal
    expected = ((1 - math.cos(math.pi / 4)) + 1) / 2
    assert task.loss(pred, true).item() == pytest.approx(expected, abs=1e-6)
    empty = torch.zeros_like(true)
    assert task.valid_mask(torch.cat([true, empty])).tolist() == [True, False]
    assert task.masked_loss(torch.cat([pred, pred]), torch.cat([true, empty])).item() == pytest.approx(expected, abs=1e-6)


# --- dense head and ResNet feature maps -------------------------------------------------------


def test_dense_head_upsamples_to_out_size():
    head = HEADS.get("dense")((16, 3, 4), 5, out_size=[24, 32], hidden=8)
    x = torch.randn(2, 16, 3, 4, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 5, 24, 32) and head.per_pixel
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dense_head_refuses_vector_features():
    with pytest.raises(ValueError, match="needs feature maps.*pool=false"):
        HEADS.get("dense")((512,), 13, out_size=[8, 12])
    head = HEADS.get("dense")((16, 3, 4), 5, out_size=[8, 12])
    with pytest.raises(ValueError, match="needs feature maps.*got features of shape \\(16,\\)"):
        head(torch.randn(2, 16))


def test_pooled_trunk_with_a_dense_head_is_a_config_error(nyu_root):
    cfg = resolve(
        {"output_dir": "x", "trunk": {"name": "resnet18"}, "tasks": {"seg": {"name": "nyuv2_semantic", "root": str(nyu_root)}}}
    )
    with pytest.raises(ConfigError, match="tasks.seg.head: .*needs feature maps.*pool=false"):
        build_components(cfg)


def test_resnet18_without_pooling_returns_the_feature_map():
    trunk = build_trunk({"name": "resnet18", "pool": False})
    out = trunk(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 512, 2, 2)
    assert trunk.feature_shape((3, 64, 64)) == (512, 2, 2)
    assert trunk.state_dict().keys() == build_trunk({"name": "resnet18"}).state_dict().keys()


# --- the shipped config ----------------------------------------------------------------------


@pytest.fixture
def fake_imagenet_weights(tmp_path, monkeypatch):
    """Random resnet18 weights where torchvision caches IMAGENET1K_V1, and no downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = torchvision.models.get_model_weights("resnet18")["IMAGENET1K_V1"].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)


def test_shipped_nyuv2_config_validates_on_a_tiny_tree(nyu_root, tmp_path, fake_imagenet_weights):
    # One override moves all three tasks: depth and normal read tasks.semantic.root.
    cfg = load_config(ROOT / "configs" / "nyuv2.yaml", [f"tasks.semantic.root={nyu_root}", f"output_dir={tmp_path / 'run'}"])
    parts = build_components(cfg)
    assert set(parts.model.heads) == set(cfg.tasks) == {"semantic", "depth", "normal"}
    assert len({t.input_key() for t in parts.tasks.values()}) == 1
    assert parts.model.trunk.feature_shape((3, 288, 384)) == (512, 9, 12)
    for name, head in parts.model.heads.items():
        assert type(head).__name__ == "DenseHead" and head.out_size == (288, 384), name
