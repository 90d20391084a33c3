"""Dense (per-pixel) prediction: which pixels are labelled, per-sample losses, streaming metrics.

Shapes: outputs ``[B, C, H, W]``; targets are class maps ``[B, H, W]`` (a negative class
marks an unlabelled pixel), depth ``[B, 1, H, W]`` (0 = no measurement) or unit surface
normals ``[B, 3, H, W]`` (all zero = none).

Losses return one value per sample, the mean over that sample's valid pixels (0 when it has
none), as the Task contract asks. Metrics count every valid pixel of a split once (a pixel
mean over the split, not a mean of batch means), with states that sum across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

# --- valid pixels ---------------------------------------------------------------------------


def labelled_pixels(target: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` class map -> bool map of labelled pixels (NYUv2 marks the rest -1)."""
    return target >= 0


def depth_pixels(target: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` depth -> bool map of measured pixels (the sensor leaves 0 where it has none)."""
    return target > 0


def normal_pixels(target: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` normals -> ``[B, H, W]`` bool map of pixels with a normal (not all zero)."""
    return target.abs().sum(dim=1) > 0


def _mean_per_sample(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    values, valid = values.flatten(1), valid.flatten(1)
    return torch.where(valid, values, 0).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


# --- per-sample losses ----------------------------------------------------------------------


def cross_entropy_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's labelled pixels, ``[B]``."""
    valid = labelled_pixels(target)
    ce = F.cross_entropy(logits.float(), target.clamp(min=0).long(), reduction="none")
    return _mean_per_sample(ce, valid)


def l1_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``|pred - depth|`` over each sample's measured pixels, ``[B]``."""
    return _mean_per_sample((pred.float() - target.float()).abs(), depth_pixels(target))


def cosine_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(pred, normal)`` over each sample's pixels with a normal, ``[B]``; the
    prediction is L2-normalised per pixel, the target normals are unit vectors."""
    cos = (F.normalize(pred.float(), dim=1) * target.float()).sum(dim=1)
    return _mean_per_sample(1 - cos, normal_pixels(target))


# --- streaming metrics ----------------------------------------------------------------------


class _ConfusionMatrix(Metric):
    """Confusion matrix ``[true, predicted]`` over labelled pixels; predictions are the argmax over classes."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        valid = labelled_pixels(target)
        pred, true = logits.argmax(dim=1)[valid], target[valid].long()
        k = self.num_classes
        self.confmat += torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)


class MeanIoU(_ConfusionMatrix):
    """Mean over classes of IoU = TP / (TP + FP + FN); a class absent from both the targets
    and the predictions (no union) is left out of the mean."""

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        tp = self.confmat.diag()
        union = self.confmat.sum(dim=0) + self.confmat.sum(dim=1) - tp
        present = union > 0
        return (tp[present] / union[present]).mean()


class PixelAccuracy(_ConfusionMatrix):
    """Share of labelled pixels whose predicted class is right."""

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        return self.confmat.diag().sum() / self.confmat.sum()


class DepthError(Metric):
    """Mean over measured pixels of ``|pred - depth|`` (absolute error) or, with
    ``relative=True``, of ``|pred - depth| / depth`` (relative error)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, relative: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.relative = relative
        self.add_state("total", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        # Pixel counts pass 2**24 on a full split, past which float32 stops counting exactly.
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = depth_pixels(target)
        pred, true = pred.float()[valid], target.float()[valid]
        err = (pred - true).abs()
        self.total += (err / true if self.relative else err).sum()
        self.count += valid.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def angle_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between predicted and true normals, at the pixels with a normal (1-D).

    ``atan2(|p x n|, p . n)`` is the angle whatever the vectors' lengths, and unlike
    ``acos(p . n)`` it stays accurate near 0 degrees, where most good predictions lie.
    """
    valid = normal_pixels(target)
    pred, target = pred.float(), target.float()
    sin = torch.linalg.cross(pred, target, dim=1).norm(dim=1)
    cos = (pred * target).sum(dim=1)
    return torch.rad2deg(torch.atan2(sin, cos))[valid]


class AngleMean(Metric):
    """Mean angle error in degrees between predicted and true surface normals."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        angles = angle_errors(pred, target)
        self.total += angles.sum()
        self.count += angles.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class AngleMedian(Metric):
    """Median angle error in degrees, from a histogram of 0.001-degree bins.

    A histogram rather than a list of every angle: a full NYUv2 test split has ~70M valid
    pixels (~280 MB of angles to keep and gather across processes); the histogram is a fixed
    1.4 MB that sums across processes, and the median is exact to half a bin (0.0005 degrees).
    Like ``numpy.median``, an even count takes the mean of the two middle values.
    """

    higher_is_better = False
    full_state_update = False
    bin_width = 0.001
    num_bins = 180_000  # [0, 180] degrees

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        bins = (angle_errors(pred, target) / self.bin_width).long().clamp(max=self.num_bins - 1)
        self.hist += torch.bincount(bins, minlength=self.num_bins)

    def compute(self) -> torch.Tensor:
        cdf = self.hist.cumsum(dim=0)
        n = cdf[-1]
        ranks = torch.stack([(n + 1) // 2, n // 2 + 1])  # 1-based ranks of the middle value(s)
        bins = torch.searchsorted(cdf, ranks)  # first bin holding that many angles
        return ((bins + 0.5) * self.bin_width).mean()


class AngleWithin(Metric):
    """Share of pixels whose angle error is below ``threshold`` degrees (strictly, as MTAN counts)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("within", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        angles = angle_errors(pred, target)
        self.within += (angles < self.threshold).sum()
        self.count += angles.numel()

    def compute(self) -> torch.Tensor:
        return self.within / self.count
