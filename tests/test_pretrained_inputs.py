"""``normalize: false`` on fashion_mnist and digits: pixels in [0, 1], which a trunk with its
own preprocessing (efficientnet_lite0's (p - 0.5) / 0.5, default input_mean 0, input_std 1)
takes as they are, so tasks of different normalisations share one trunk exactly."""

import torch

import tasks.fashion_mnist as fm
from mtl.trunks import build_trunk
from tasks.digits import Digits

from test_task_library_mnist_tabular import fashion_tree


def test_fashion_mnist_unnormalized_pixels(tmp_path):
    root = str(fashion_tree(tmp_path))
    raw = fm.FashionMNIST(root=root, normalize=False).build_datasets().test.tensors[0]
    scaled = fm.FashionMNIST(root=root).build_datasets().test.tensors[0]
    # Test image i is black but for pixel (0, 0) = 100 + i + 1 (fashion_tree).
    assert torch.equal(raw[:, 0, 0, 0], torch.arange(101, 109) / 255.0) and raw[:, 0, 1:, 1:].eq(0).all()
    assert torch.allclose(scaled, (raw - fm.FASHION_MEAN) / fm.FASHION_STD)


def test_digits_unnormalized_reach_the_trunk_as_its_weights_expect():
    x = Digits(size=32, normalize=False).build_datasets().train.tensors[0][:4]
    assert x.min() == 0 and x.max() <= 1
    trunk = build_trunk({"name": "efficientnet_lite0", "image_size": 32})
    # At its own size, grey repeated to RGB: exactly (p - 0.5) / 0.5, black background -1.
    assert torch.equal(trunk.preprocess(x), ((x - 0.5) / 0.5).expand(-1, 3, -1, -1))
