"""Tabular tasks from the datasets scikit-learn and statsmodels ship (offline): wine, breast
cancer, diabetes (sklearn); Fair's survey of affairs (statsmodels, ``pip install 'mtl[tabular]'``).

Inputs are 1-D feature vectors for the ``mlp`` trunk (``trunk: {name: mlp, in_features:
N}``). Features are standardized with the mean and (population) std of the training
split before ``train_fraction`` subsampling, so val and test inputs do not change with
the labelled fraction and no val/test statistic leaks into them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
import torchmetrics
from torch.utils.data import TensorDataset

from mtl.data import split_indices, subsample
from mtl.task import ClassificationTask, RegressionTask, Splits, Task, register_task


def _standardize(values: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values - mean) / std`` with the statistics of the rows ``train``; also the mean and std."""
    mean = values[train].mean(dim=0)
    std = values[train].std(dim=0, correction=0).clamp(min=1e-8)  # a constant column stays finite
    return (values - mean) / std, mean, std


@lru_cache(maxsize=8)
def _load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features ``[n, d]`` float32 and targets of an sklearn dataset."""
    import sklearn.datasets

    loader: Callable[..., Any] = getattr(sklearn.datasets, f"load_{name}")
    # load_diabetes scales its features by default; scaled=False gives the raw ones.
    data = loader(scaled=False) if name == "diabetes" else loader()
    return torch.as_tensor(data.data, dtype=torch.float32), torch.as_tensor(data.target)


def tabular_splits(x: torch.Tensor, y: torch.Tensor, task: Task) -> Splits:
    """Split by the task's fractions and split seed; features standardized on the train split."""
    train, val, test = split_indices(len(x), task.val_fraction, task.test_fraction, task.split_seed)
    x, _, _ = _standardize(x, train)
    train = subsample(train, task.train_fraction, task.subset_seed)
    return Splits(*(TensorDataset(x[i], y[i]) for i in (train, val, test)))


# Fair (1978), "A Theory of Extramarital Affairs", J. Political Economy 86(1): 6,366 women of a
# 1974 Redbook survey. Both tasks read the same seven columns, so one trunk serves both.
FAIR_FEATURES = ("age", "yrs_married", "children", "religious", "educ", "occupation", "occupation_husb")


@lru_cache(maxsize=1)
def _load_fair() -> Any:
    try:
        import statsmodels.api as sm
    except ImportError:
        raise ImportError("the fair_* tasks read statsmodels' bundled `fair` dataset: pip install 'mtl[tabular]' "
                          "(or make install).") from None
    return sm.datasets.fair.load_pandas().data


def _fair_features() -> torch.Tensor:
    return torch.as_tensor(_load_fair()[list(FAIR_FEATURES)].to_numpy(), dtype=torch.float32)


@register_task("fair_affair")
class FairAffair(ClassificationTask):
    """Fair's affairs survey (statsmodels): did the woman have an affair (affairs > 0; 32 % yes),
    2 classes, 6,366 samples × 7 features (age, years married, children, religiousness,
    education, her and her husband's occupation). Split 70/10/20 by split_seed.

    Metrics: accuracy (primary) and macro F1, higher is better.
    """

    input_shape = (len(FAIR_FEATURES),)

    def __init__(self, **kwargs: Any):
        super().__init__(num_classes=2, **kwargs)

    def build_datasets(self) -> Splits:
        y = torch.tensor((_load_fair()["affairs"] > 0).to_numpy()).long()
        return tabular_splits(_fair_features(), y, self)


@register_task("fair_marriage")
class FairMarriage(ClassificationTask):
    """Fair's affairs survey (statsmodels): the woman's rating of her marriage (1 very poor to
    5 very good) as 5 classes, from the same 7 features and rows as ``fair_affair``, a source
    for it. Split 70/10/20 by split_seed.

    Metrics: accuracy (primary) and macro F1, higher is better.
    """

    input_shape = (len(FAIR_FEATURES),)

    def __init__(self, **kwargs: Any):
        super().__init__(num_classes=5, **kwargs)

    def build_datasets(self) -> Splits:
        y = torch.tensor(_load_fair()["rate_marriage"].to_numpy()).long() - 1
        return tabular_splits(_fair_features(), y, self)


@register_task("wine")
class Wine(ClassificationTask):
    """Wine cultivars, 3 classes, 178 samples × 13 features (sklearn), split 70/10/20 by split_seed.

    Metrics: accuracy (primary) and macro F1, higher is better.
    """

    input_shape = (13,)

    def __init__(self, **kwargs: Any):
        super().__init__(num_classes=3, **kwargs)

    def build_datasets(self) -> Splits:
        x, y = _load("wine")
        return tabular_splits(x, y.long(), self)


@register_task("breast_cancer")
class BreastCancer(ClassificationTask):
    """Breast cancer (Wisconsin) malignant/benign as 2 classes, 569 samples × 30 features (sklearn).

    Metrics: accuracy (primary) and macro F1, higher is better. Split 70/10/20 by split_seed.
    """

    input_shape = (30,)

    def __init__(self, **kwargs: Any):
        super().__init__(num_classes=2, **kwargs)

    def build_datasets(self) -> Splits:
        x, y = _load("breast_cancer")
        return tabular_splits(x, y.long(), self)


class _ScaledError(torchmetrics.Metric):
    """An error metric (MAE, RMSE) of standardized values, read in the original units: both
    inputs times ``scale``, the std (the standardization's shift cancels in an error)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, metric: torchmetrics.Metric, scale: float):
        super().__init__()
        self.metric = metric
        self.scale = scale

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.metric.update(preds * self.scale, target * self.scale)

    def compute(self) -> torch.Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        super().reset()
        self.metric.reset()


@register_task("diabetes")
class Diabetes(RegressionTask):
    """Diabetes progression after one year, regression, 442 samples × 10 features (sklearn).

    The target (a score of 25-346) is standardized with the train split's mean and std,
    so the default heads and learning rates fit it and the MSE loss is in standardized
    units; the metrics MAE (primary) and RMSE, lower is better, are in the target's own
    units. Split 70/10/20 by split_seed.
    """

    input_shape = (10,)

    def __init__(self, **kwargs: Any):
        super().__init__(num_outputs=1, **kwargs)

    def _target(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardized targets, and the train split's mean and std (also needed by metrics())."""
        _, y = _load("diabetes")
        train, _, _ = split_indices(len(y), self.val_fraction, self.test_fraction, self.split_seed)
        return _standardize(y.float(), train)

    def build_datasets(self) -> Splits:
        return tabular_splits(_load("diabetes")[0], self._target()[0], self)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        scale = self._target()[2].item()
        return {name: _ScaledError(metric, scale) for name, metric in super().metrics().items()}
