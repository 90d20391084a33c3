"""Splits and batch sources.

Small datasets (tensors) live on the training device and are batched by indexing a
permutation there: no DataLoader and no per-sample Python in the hot loop. Other datasets
stream through a DataLoader. Either way every pass draws a fresh permutation from the
source's own generator, so no epoch is ever cached and the order is fixed by the seed.
"""

from __future__ import annotations

from typing import Hashable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mtl.task import Splits, Task


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint train/val/test indices of ``range(n)``, a fixed function of ``seed``."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(
            f"{n} samples cannot be split into non-empty train/val/test: val_fraction {val_fraction} and "
            f"test_fraction {test_fraction} give {n - n_val - n_test}/{n_val}/{n_test} samples. Choose fractions "
            "that leave each split at least one sample."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def subsample(indices: torch.Tensor, fraction: float, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded ``fraction`` of ``indices``. With class ``labels`` (aligned with ``indices``)
    the draw is stratified: round(n_c · fraction) of each class c, at least one, so a
    labelled-data experiment at a few examples per class never drops a class."""
    if fraction >= 1:
        return indices
    generator = torch.Generator().manual_seed(seed + 1)
    if labels is None:
        keep = max(1, round(len(indices) * fraction))
        return indices[torch.randperm(len(indices), generator=generator)[:keep]]
    kept = []
    for c in torch.unique(labels):
        members = indices[labels == c]
        keep = max(1, round(len(members) * fraction))
        kept.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(kept)


def tensor_splits(x: torch.Tensor, y: torch.Tensor, task: Task) -> Splits:
    """Split ``(x, y)`` with the task's fractions and split seed into TensorDatasets."""
    if len(x) != len(y):
        raise ValueError(f"task {task.name!r}: {len(x)} inputs but {len(y)} targets.")
    train, val, test = split_indices(len(x), task.val_fraction, task.test_fraction, task.split_seed)
    classes = y[train] if y.dim() == 1 and not y.is_floating_point() else None
    train = subsample(train, task.train_fraction, task.subset_seed, classes)
    return Splits(*(TensorDataset(x[i], y[i]) for i in (train, val, test)))


Batch = tuple[torch.Tensor, ...]  # (inputs, targets of each task fed by these inputs)


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors behind a TensorDataset (or a Subset of one)."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors)
    if isinstance(dataset, Subset):
        inner = _tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(dataset.indices)
            return tuple(t[idx] for t in inner)
    return None


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """``[N, ...]``: every target of an in-memory dataset; of another, the first sample's as
    ``[1, ...]`` (reading every file would cost a pass over the data before training)."""
    tensors = _tensors(dataset)
    if tensors is not None:
        return tensors[1]
    return torch.as_tensor(dataset[0][1]).unsqueeze(0)


class SharedInputs(Dataset):
    """Tasks that share inputs as one dataset: item i is ``(x, y_task1, y_task2, ...)``,
    reading the input once (from the first task's dataset). A dataset that reads files
    should define ``target(i)`` so the other tasks' targets come without a second read."""

    def __init__(self, datasets: list[Dataset]):
        self.datasets = datasets

    def __len__(self) -> int:
        return len(self.datasets[0])  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Batch:
        x, y = self.datasets[0][i]
        return (x, y, *(d.target(i) if hasattr(d, "target") else d[i][1] for d in self.datasets[1:]))


def shared_inputs(datasets: list[Dataset]) -> Dataset:
    """One dataset for tasks with identical inputs: a TensorDataset when they all are."""
    if len(datasets) == 1:
        return datasets[0]
    tensors = [_tensors(d) for d in datasets]
    if all(t is not None and len(t) == 2 for t in tensors):
        return TensorDataset(tensors[0][0], *(t[1] for t in tensors))  # type: ignore[index]
    return SharedInputs(datasets)


class BatchSource:
    """Endless shuffled batches of one dataset; one pass = ``batches_per_pass`` batches.

    Tensor datasets are indexed by a permutation without a DataLoader: on the device when
    ``on_device`` and they fit in ``device_limit_mb``, else on the host with each batch
    copied over. Other datasets go through a DataLoader with ``num_workers`` workers.
    ``drop_last`` keeps every training batch full (BatchNorm and per-step costs stay
    even); a dataset smaller than one batch yields itself whole.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        seed: int,
        on_device: bool = True,
        device_limit_mb: float = 1024.0,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError("empty training set")
        self.batch_size = min(batch_size, self.n)
        self.device = device
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors = _tensors(dataset)
        self.on_device = False
        if self.tensors is not None and on_device and sum(t.nbytes for t in self.tensors) <= device_limit_mb * 2**20:
            self.tensors = tuple(t.to(device) for t in self.tensors)
            self.on_device = True
        self._pass_state = self.generator.get_state()
        self._position = 0  # batches already drawn from the current pass
        self._iter: Iterator[Batch] | None = None

    @property
    def batches_per_pass(self) -> int:
        return self.n // self.batch_size

    def _pass(self, start: int) -> Iterator[Batch]:
        self.generator.set_state(self._pass_state)
        perm = torch.randperm(self.n, generator=self.generator)
        bs = self.batch_size
        if self.tensors is not None:
            perm = perm.to(self.tensors[0].device)
            for b in range(start, self.batches_per_pass):
                idx = perm[b * bs : (b + 1) * bs]
                yield tuple(t[idx].to(self.device, non_blocking=True) for t in self.tensors)
        else:
            rest = perm[start * bs : self.batches_per_pass * bs].tolist()
            loader = DataLoader(
                Subset(self.dataset, rest), batch_size=bs, drop_last=True, num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            for batch in loader:
                yield tuple(t.to(self.device, non_blocking=True) for t in batch)

    def next(self) -> Batch:
        if self._iter is None:
            self._iter = self._pass(self._position)
        batch = next(self._iter, None)
        if batch is None:
            # The generator now holds the state after this pass's permutation: the next pass starts there.
            self._pass_state = self.generator.get_state()
            self._position = 0
            self._iter = self._pass(0)
            batch = next(self._iter)
        self._position += 1
        return batch

    def state_dict(self) -> dict:
        """Where the source stands: the current pass's seed state and how far into it."""
        return {"pass_state": self._pass_state.clone(), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._pass_state = state["pass_state"].clone()
        self._position = state["position"]
        self._iter = None


def shared_input_groups(tasks: dict[str, Task]) -> dict[str, list[str]]:
    """``{source: tasks}``: tasks that return one ``input_key`` (not None) together, named
    ``a+b``, every other task alone, in the order of ``tasks``. The rule of the joint training
    loader (``mtl.builders.input_groups``, which also checks that the inputs are identical)."""
    by_key: dict[Hashable, list[str]] = {}
    for name, task in tasks.items():
        key = task.input_key()
        by_key.setdefault(name if key is None else ("shared", key), []).append(name)
    return {"+".join(members): members for members in by_key.values()}


def eval_batches(
    dataset: Dataset, batch_size: int, part: tuple[int, int] = (0, 1), num_workers: int = 0, pin_memory: bool = False
) -> Iterator[Batch]:
    """The dataset in order, in batches ``(x, y, ...)`` (every tensor of an item), on the host;
    with ``part=(rank, world)`` only the rank-th of ``world`` contiguous shares (sizes differ by
    at most one, no sample repeated), so ranks that each evaluate their share see every sample
    exactly once. Datasets that are not tensors are read by a DataLoader with ``num_workers``
    workers; ``pin_memory`` (for a CUDA device) pins every batch, so that the caller's
    ``.to(device, non_blocking=True)`` overlaps the copy with compute."""
    rank, world = part
    tensors = _tensors(dataset)
    if tensors is not None:
        shares = [t.tensor_split(world)[rank] for t in tensors]
        for i in range(0, len(shares[0]), batch_size):
            batch = tuple(t[i : i + batch_size] for t in shares)
            yield tuple(t.pin_memory() for t in batch) if pin_memory else batch
    else:
        share = torch.arange(len(dataset)).tensor_split(world)[rank].tolist()  # type: ignore[arg-type]
        loader = DataLoader(
            Subset(dataset, share) if world > 1 else dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory
        )
        for batch in loader:
            yield tuple(batch)
