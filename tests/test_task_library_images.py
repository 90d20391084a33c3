"""cifar10/cifar100, celeba/celeba_attribute, office31/office_home on tiny trees written in
each dataset's real on-disk layout."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mtl.heads import HEADS
from mtl.task import TASKS
from tasks.celeba import ATTRIBUTES, PositiveClassF1
from tasks.cifar import CIFAR10, CIFAR100, UnsafePickleError, read_batch
from tasks.office import IMAGENET_MEAN, IMAGENET_STD, Office31, OfficeHome

# ---------------------------------------------------------------- shared checks


def check_head_loss_metrics(task, splits, batch=4):
    """The default head on fake features fits the targets; loss and metrics are finite."""
    x, y = next(iter(DataLoader(splits.train, batch_size=batch)))
    assert tuple(x.shape[1:]) == tuple(task.input_shape) and x.dtype == torch.float32
    head = HEADS.get(task.head_config()["name"])((16,), task.num_outputs)
    out = head(torch.randn(len(x), 16))
    loss = task.masked_loss(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, metric in task.metrics().items():
        assert metric.higher_is_better is not None, name
        metric.update(out.detach(), y)
        assert torch.isfinite(metric.compute())


def write_jpg(path, width, height, color=(0, 0, 255), mode="RGB", bands=None):
    """A solid image; ``bands`` paints ``(axis, start, stop, color)`` stripes over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, (width, height), color)
    for axis, start, stop, band_color in bands or ():
        box = (0, start, width, stop) if axis == "rows" else (start, 0, stop, height)
        image.paste(band_color, box)
    image.save(path, quality=100, subsampling=0)


def normalized(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])


# ---------------------------------------------------------------- CIFAR


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as the cPickle
    that wrote the CIFAR files did, so the test file has their opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def write_cifar_pickle(path, entries, python2=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    if python2:
        import io

        buffer = io.BytesIO()
        Py2Pickler(buffer, protocol=2).dump(entries)
        # numpy 1 (which wrote the originals) named its module numpy.core.multiarray.
        data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    else:
        data = pickle.dumps(entries, protocol=2)
    path.write_bytes(data)


def cifar_images(ids):
    """uint8 ``[N, 3072]``; image i's first red pixel holds its id, so splits can be traced."""
    data = np.zeros((len(ids), 3072), dtype=np.uint8)
    data[:, 0] = ids
    data[:, 1024] = 255  # first green pixel: checks the channel-major row layout
    return data


def write_cifar10(root, per_batch=4, n_test=5, python2=True):
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        ids = list(range(b * per_batch, (b + 1) * per_batch))
        entries = {b"batch_label": b"training batch", b"labels": [i % 10 for i in ids], b"data": cifar_images(ids),
                   b"filenames": [b"x.png"] * per_batch}  # fmt: skip
        write_cifar_pickle(folder / f"data_batch_{b + 1}", entries, python2)
    ids = list(range(100, 100 + n_test))
    write_cifar_pickle(folder / "test_batch", {b"labels": [i % 10 for i in ids], b"data": cifar_images(ids)}, python2)
    write_cifar_pickle(folder / "batches.meta", {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch}, python2)
    return folder


def write_cifar100(root, n_train=20, n_test=5):
    folder = root / "cifar-100-python"
    for name, ids in (("train", range(n_train)), ("test", range(100, 100 + n_test))):
        entries = {b"fine_labels": [i % 100 for i in ids], b"coarse_labels": [i % 20 for i in ids], b"data": cifar_images(list(ids))}
        write_cifar_pickle(folder / name, entries)
    write_cifar_pickle(folder / "meta", {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [b"fish"] * 20})
    return folder


def image_ids(ds):
    """The id written into each image's first red pixel, undoing CIFAR-10's normalization."""
    return ((ds.tensors[0][:, 0, 0, 0] * CIFAR10.std[0] + CIFAR10.mean[0]) * 255).round().long().tolist()


@pytest.mark.parametrize("python2", [True, False], ids=["python2-cpickle", "python3-protocol2"])
def test_cifar10_reads_the_torchvision_layout(tmp_path, python2):
    write_cifar10(tmp_path, python2=python2)
    task = CIFAR10(root=str(tmp_path))
    splits = task.build_datasets()
    assert [len(ds) for _, ds in splits.items()] == [18, 2, 5]  # val = round(0.1 * 20); test = the test batch
    train, val, test = (image_ids(ds) for _, ds in splits.items())
    assert sorted(train + val) == list(range(20)) and not set(train) & set(val)
    assert test == list(range(100, 105))
    assert splits.train.tensors[1].tolist() == [i % 10 for i in train]
    x = splits.test.tensors[0][0]
    # Green's first pixel is 255, every other (but red's first) 0: (v/255 - mean) / std.
    assert x[1, 0, 0].item() == pytest.approx((1 - 0.4822) / 0.2435, abs=1e-4)
    assert x[2, 0, 0].item() == pytest.approx(-0.4465 / 0.2616, abs=1e-4)
    assert x[1, 0, 1].item() == pytest.approx(-0.4822 / 0.2435, abs=1e-4)
    again = CIFAR10(root=str(tmp_path)).build_datasets()
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for (_, a), (_, b) in zip(splits.items(), again.items()))
    other_seed = CIFAR10(root=str(tmp_path), split_seed=1).build_datasets()
    assert image_ids(other_seed.val) != val
    check_head_loss_metrics(task, splits)


def test_cifar10_train_fraction_keeps_val_and_test(tmp_path):
    write_cifar10(tmp_path)
    full = CIFAR10(root=str(tmp_path)).build_datasets()
    half = CIFAR10(root=str(tmp_path), train_fraction=0.5).build_datasets()
    assert len(half.train) == 9 and set(image_ids(half.train)) <= set(image_ids(full.train))
    assert torch.equal(half.val.tensors[0], full.val.tensors[0])


def test_cifar100_fine_and_coarse_share_inputs(tmp_path):
    write_cifar100(tmp_path)
    fine, coarse = CIFAR100(root=str(tmp_path)), CIFAR100(label="coarse", root=str(tmp_path))
    assert (fine.num_outputs, coarse.num_outputs) == (100, 20)
    assert fine.input_key() == coarse.input_key() != CIFAR100(label="coarse", root=str(tmp_path), split_seed=1).input_key()
    a, b = fine.build_datasets(), coarse.build_datasets()
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1] % 20, b.test.tensors[1])
    check_head_loss_metrics(coarse, b)
    with pytest.raises(ValueError, match="'fine'.*'coarse'"):
        CIFAR100(label="superclass")


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_cifar_pickle_is_refused_and_nothing_runs(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "it_ran"
    bad = folder / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": RunsAShellCommand(marker)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"{bad}: refused to unpickle (posix|os)\.system"):
        CIFAR10(root=str(tmp_path)).build_datasets()
    assert not marker.exists()
    # The same payload at the top level, and the other classic gadget.
    for payload in (RunsAShellCommand(marker), type("E", (), {"__reduce__": lambda s: (eval, ("1",))})()):
        bad.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(UnsafePickleError, match="refused"):
            read_batch(bad, ("labels",))
    assert not marker.exists()


def test_cifar_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="root=PATH.*download=True"):
        CIFAR10().build_datasets()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'cifar-10-batches-py'} does not exist.*data_batch_1"):
        CIFAR10(root=str(tmp_path)).build_datasets()
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder / 'data_batch_3'} is missing"):
        CIFAR10(root=str(tmp_path)).build_datasets()
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q")  # truncated
    with pytest.raises(ValueError, match=f"{folder / 'data_batch_3'}: not a readable CIFAR pickle"):
        CIFAR10(root=str(tmp_path)).build_datasets()
    write_cifar_pickle(folder / "data_batch_3", {b"data": cifar_images([1]), b"labels": [1, 2]})
    with pytest.raises(ValueError, match="1 images but"):
        CIFAR10(root=str(tmp_path)).build_datasets()


def test_cifar_download_uses_torchvisions_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    calls = []

    def fake_download(url, download_root, filename, md5):
        calls.append((url, filename))
        write_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    splits = CIFAR10(root=str(tmp_path), download=True).build_datasets()
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz")]
    assert len(splits.test) == 5
    CIFAR10(root=str(tmp_path), download=True).build_datasets()
    assert len(calls) == 1  # present data is not fetched again


# ---------------------------------------------------------------- CelebA

CELEBA_PARTITION = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 1, "000004.jpg": 2, "000005.jpg": 0}


def celeba_values(i):
    """Image i (1-based) has attribute j iff (i + j) is even; its attributes as 1/-1."""
    return [1 if (i + j) % 2 == 0 else -1 for j in range(len(ATTRIBUTES))]


def write_celeba(root):
    folder = root / "celeba"
    for name in CELEBA_PARTITION:
        # Aligned CelebA images are 178×218: red bands on the 20 rows above and below the
        # central 178×178 square, which is blue.
        write_jpg(folder / "img_align_celeba" / name, 178, 218, bands=[("rows", 0, 20, (255, 0, 0)), ("rows", 198, 218, (255, 0, 0))])
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in celeba_values(i)) for i, name in enumerate(CELEBA_PARTITION, start=1)]
    (folder / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{' '.join(ATTRIBUTES)} \n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in CELEBA_PARTITION.items()))
    return folder


def names(ds):
    return [os.path.basename(p) for p in ds.paths]


def test_celeba_multilabel_reads_attributes_and_the_official_partition(tmp_path):
    write_celeba(tmp_path)
    task = TASKS.get("celeba")(root=str(tmp_path))
    splits = task.build_datasets()
    assert sorted(names(splits.train)) == ["000001.jpg", "000002.jpg", "000005.jpg"]
    assert names(splits.val) == ["000003.jpg"] and names(splits.test) == ["000004.jpg"]
    x, y = splits.val[0]
    assert x.shape == (3, 64, 64) and y.dtype == torch.long
    assert y.tolist() == [(3 + j + 1) % 2 for j in range(40)]  # 1 -> 1, -1 -> 0
    # The crop keeps the central 178×178 square: no red from the bands above and below.
    assert torch.allclose(x, normalized((0, 0, 255)).view(3, 1, 1).expand_as(x), atol=0.05)
    assert task.num_outputs == 40 and task.head_config()["name"] == "multilabel"
    check_head_loss_metrics(task, splits, batch=3)
    again = TASKS.get("celeba")(root=str(tmp_path)).build_datasets()
    assert [names(ds) for _, ds in again.items()] == [names(ds) for _, ds in splits.items()]


def test_celeba_attribute_subset_and_single_attribute_tasks(tmp_path):
    write_celeba(tmp_path)
    root = str(tmp_path)
    subset = TASKS.get("celeba")(root=root, attributes=["Smiling", "5_o_Clock_Shadow"], size=32)
    _, y = subset.build_datasets().test[0]  # image 4: attribute j present iff j is even
    assert y.tolist() == [0, 1] and ATTRIBUTES.index("Smiling") == 31
    smiling = TASKS.get("celeba_attribute")(attribute="Smiling", root=root, size=32)
    male = TASKS.get("celeba_attribute")(attribute="Male", root=root, size=32)
    assert smiling.num_outputs == 2
    a, b = smiling.build_datasets(), male.build_datasets()
    assert a.test.targets.tolist() == [0] and b.test.targets.tolist() == [1]  # Male is column 20
    assert smiling.input_key() == male.input_key() == subset.input_key()
    assert [names(ds) for _, ds in a.items()] == [names(ds) for _, ds in b.items()]
    assert smiling.input_key() != TASKS.get("celeba_attribute")(attribute="Male", root=root).input_key()  # size 64
    assert smiling.input_key() != TASKS.get("celeba_attribute")(attribute="Male", root=root, size=32, train_fraction=0.5).input_key()
    check_head_loss_metrics(smiling, a, batch=3)


def test_celeba_positive_class_f1_counts_tp_fp_fn():
    """Targets 1 1 1 0 0 0, predicted (argmax) 1 1 0 1 0 0: TP 2, FN 1, FP 1, so
    F1 = 2·2 / (2·2 + 1 + 1) = 2/3 (accuracy 4/6); the negative class's F1 would be 2/3 too, so
    a second case tells them apart: targets 1 0 0 0, predicted 1 1 0 0: TP 1, FP 1, F1 = 2/3,
    the negative class's 4/5."""
    f1 = PositiveClassF1()
    logits = torch.tensor([[0.0, 2.0], [1.0, 3.0], [2.0, -1.0], [0.5, 0.6], [3.0, 0.0], [1.0, 0.0]])
    f1.update(logits, torch.tensor([1, 1, 1, 0, 0, 0]))
    assert f1.compute().item() == pytest.approx(2 / 3)
    f1.reset()
    f1.update(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0, 0, 0]))
    assert f1.compute().item() == pytest.approx(2 / 3)
    f1.reset()
    f1.update(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 0]))  # a tie counts as negative
    assert f1.compute().item() == 0.0  # no positive predicted or present: 0, as FAMO's code gives


def test_celeba_metric_f1_makes_f1_primary(tmp_path):
    write_celeba(tmp_path)
    root = str(tmp_path)
    smiling = TASKS.get("celeba_attribute")(attribute="Smiling", root=root, size=32, metric="f1")
    assert smiling.primary_metric == "f1" and set(smiling.metrics()) == {"accuracy", "macro_f1", "f1"}
    assert smiling.metrics()["f1"].higher_is_better
    check_head_loss_metrics(smiling, smiling.build_datasets(), batch=3)
    assert TASKS.get("celeba_attribute")(attribute="Smiling", root=root).primary_metric == "accuracy"
    assert "f1" not in TASKS.get("celeba_attribute")(attribute="Smiling", root=root).metrics()
    multilabel = TASKS.get("celeba")(root=root, size=32, metric="f1")
    assert multilabel.primary_metric == "macro_f1"
    with pytest.raises(ValueError, match="metric must be 'accuracy' or 'f1'.*got 'F1'"):
        TASKS.get("celeba_attribute")(attribute="Smiling", metric="F1")


def test_celeba_train_fraction_subsamples_train_only(tmp_path):
    write_celeba(tmp_path)
    splits = TASKS.get("celeba")(root=str(tmp_path), train_fraction=0.4, split_seed=5).build_datasets()
    assert len(splits.train) == 1 and names(splits.test) == ["000004.jpg"]


def test_celeba_unknown_attribute_lists_close_matches():
    with pytest.raises(ValueError, match="no attribute 'Smilling'. Did you mean 'Smiling'"):
        TASKS.get("celeba_attribute")(attribute="Smilling")
    with pytest.raises(ValueError, match="Did you mean 'Male'"):
        TASKS.get("celeba")(attributes=["male"])


def test_celeba_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="root=PATH.*list_eval_partition.txt"):
        TASKS.get("celeba")().build_datasets()
    folder = write_celeba(tmp_path)
    (folder / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder / 'list_eval_partition.txt'} does not exist"):
        TASKS.get("celeba")(root=str(tmp_path)).build_datasets()
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(ValueError, match="does not list 4 images"):
        TASKS.get("celeba")(root=str(tmp_path)).build_datasets()
    write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder / 'img_align_celeba' / '000001.jpg'} does not exist"):
        TASKS.get("celeba")(root=str(tmp_path)).build_datasets()


def test_celeba_bad_attribute_values_name_the_line(tmp_path):
    folder = write_celeba(tmp_path)
    path = folder / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("-1", " 0", 1)
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=f"{path}, line 4: expected a file name and 40 values of 1 or -1"):
        TASKS.get("celeba")(root=str(tmp_path)).build_datasets()


# ---------------------------------------------------------------- Office

OFFICE31_CLASSES = [f"class_{i:02d}" for i in range(31)]


def write_office(root, domains, classes, nested_images=True, width=16, height=8):
    """One small image per class per domain; a left and a right quarter of red around a
    blue centre, so a shorter-side resize and centre crop leaves only blue."""
    for domain in domains:
        for c in classes:
            folder = root / domain / "images" / c if nested_images else root / domain / c
            bands = [("cols", 0, width // 4, (255, 0, 0)), ("cols", width - width // 4, width, (255, 0, 0))]
            write_jpg(folder / "frame_0001.jpg", width, height, bands=bands)


def test_office31_domain_task_reads_its_images(tmp_path):
    write_office(tmp_path, ("amazon", "dslr", "webcam"), OFFICE31_CLASSES)
    write_jpg(tmp_path / "amazon" / "images" / "class_03" / "grey.jpg", 16, 8, color=128, mode="L")
    task = TASKS.get("office31")(domain="amazon", root=str(tmp_path), size=32)
    splits = task.build_datasets()
    sizes = [len(ds) for _, ds in splits.items()]
    assert sizes == [19, 6, 7] or sizes == [20, 6, 6]  # 32 images, 60/20/20
    assert (task.val_fraction, task.test_fraction) == (0.2, 0.2)
    paths = [p for _, ds in splits.items() for p in ds.paths]
    assert len(set(paths)) == 32 and all("/amazon/" in p for p in paths)
    for _, ds in splits.items():
        for p, label in zip(ds.paths, ds.targets.tolist()):
            assert os.path.basename(os.path.dirname(p)) == OFFICE31_CLASSES[label]
    colour = next(i for i, p in enumerate(splits.train.paths) if p.endswith("frame_0001.jpg"))
    x, _ = splits.train[colour]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, normalized((0, 0, 255)).view(3, 1, 1).expand_as(x), atol=0.05)
    grey = [ds[ds.paths.index(p)][0] for _, ds in splits.items() for p in ds.paths if p.endswith("grey.jpg")]
    assert grey[0].shape == (3, 32, 32)
    again = TASKS.get("office31")(domain="amazon", root=str(tmp_path), size=32).build_datasets()
    assert [ds.paths for _, ds in again.items()] == [ds.paths for _, ds in splits.items()]
    assert task.input_key() is None
    check_head_loss_metrics(task, splits)


def test_office_home_reads_its_layout_and_the_real_world_spelling(tmp_path):
    classes = [f"c{i:02d}" for i in range(65)]
    write_office(tmp_path, ("Art", "Real World"), classes, nested_images=False)
    task = OfficeHome(domain="Real_World", root=str(tmp_path), size=16, train_fraction=0.5)
    splits = task.build_datasets()
    assert task.num_outputs == 65
    assert [len(ds) for _, ds in splits.items()] == [20, 13, 13]  # 39 train halved
    assert all("/Real World/" in p for p in splits.test.paths)
    check_head_loss_metrics(task, splits)


def test_office_domains_must_share_their_classes(tmp_path):
    write_office(tmp_path, ("amazon", "webcam"), OFFICE31_CLASSES)
    write_office(tmp_path, ("dslr",), OFFICE31_CLASSES[:30] + ["bike_helmet_2"])
    with pytest.raises(ValueError, match=r"domain 'dslr' .* missing \['class_30'\], extra \['bike_helmet_2'\]"):
        Office31(domain="amazon", root=str(tmp_path)).build_datasets()
    with pytest.raises(ValueError, match="domain 'amazon'"):
        Office31(domain="dslr", root=str(tmp_path)).build_datasets()


def test_office_errors(tmp_path):
    with pytest.raises(ValueError, match="no domain 'Amazon'. Did you mean 'amazon'.*Valid domains: amazon, dslr, webcam"):
        Office31(domain="Amazon")
    with pytest.raises(ValueError, match="Valid domains: Art, Clipart, Product, Real_World"):
        OfficeHome(domain="sketch")
    with pytest.raises(FileNotFoundError, match="root=PATH.*domain_adaptation_images"):
        Office31(domain="dslr").build_datasets()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'webcam' / 'images'} does not exist"):
        Office31(domain="webcam", root=str(tmp_path)).build_datasets()
    write_office(tmp_path, ("webcam",), OFFICE31_CLASSES[:5])
    with pytest.raises(ValueError, match="5 class folders, but Office-31 has 31"):
        Office31(domain="webcam", root=str(tmp_path)).build_datasets()
    write_office(tmp_path, ("webcam",), OFFICE31_CLASSES)
    (tmp_path / "webcam" / "images" / "class_07" / "frame_0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'webcam' / 'images' / 'class_07'} holds no images"):
        Office31(domain="webcam", root=str(tmp_path)).build_datasets()


def test_image_tasks_are_registered_and_marked_as_needing_data():
    for name in ("cifar10", "cifar100", "celeba", "celeba_attribute", "office31", "office_home"):
        assert TASKS.get(name).needs_data_root
