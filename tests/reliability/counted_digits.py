"""A task with sum-type metrics, for the torchrun evaluation test: counts that add up over
the ranks' shares, and would come out N times too large if N ranks evaluated the same samples."""

import torch
import torchmetrics

from tasks.digits import Digits


class Count(torchmetrics.SumMetric):
    """How many samples were evaluated; with ``correct``, how many of them the head classified right."""

    higher_is_better = True

    def __init__(self, correct: bool = False):
        super().__init__()
        self.correct = correct

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        hits = scores.argmax(dim=1) == target if self.correct else torch.ones_like(target, dtype=torch.bool)
        super().update(hits.float())


class CountedDigits(Digits):
    """sklearn digits with two counts beside accuracy and macro F1."""

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {**super().metrics(), "samples": Count(), "correct": Count(correct=True)}
