import torch
from torch.utils.data import Dataset, TensorDataset

from mtl.data import BatchSource, eval_batches, split_indices, subsample


def test_split_indices_disjoint_complete_and_stable():
    train, val, test = split_indices(100, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    together = torch.cat([train, val, test])
    assert sorted(together.tolist()) == list(range(100))
    again = split_indices(100, 0.1, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    other = split_indices(100, 0.1, 0.2, seed=4)
    assert not torch.equal(test, other[2])


def test_subsample_is_a_seeded_subset():
    idx = torch.arange(50, 100)
    sub = subsample(idx, 0.2, seed=0)
    assert len(sub) == 10 and set(sub.tolist()) <= set(idx.tolist())
    assert torch.equal(sub, subsample(idx, 0.2, seed=0))
    assert torch.equal(subsample(idx, 1.0, seed=0), idx)


def _source(n=10, bs=5, seed=0, on_device=True):
    ds = TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))
    return BatchSource(ds, bs, torch.device("cpu"), seed=seed, on_device=on_device)


def _pass(src):
    return torch.cat([src.next()[1] for _ in range(src.batches_per_pass)])


def test_every_pass_covers_the_data_and_is_reshuffled():
    src = _source()
    passes = [_pass(src) for _ in range(4)]
    for p in passes:
        assert sorted(p.tolist()) == list(range(10))
    assert len({tuple(p.tolist()) for p in passes}) > 1


def test_state_round_trip_mid_pass():
    src = _source(n=12, bs=4)
    src.next()
    state = src.state_dict()
    expected = [src.next()[1] for _ in range(5)]
    restored = _source(n=12, bs=4, seed=99)
    restored.load_state_dict(state)
    assert all(torch.equal(a, restored.next()[1]) for a in expected)


class PlainDataset(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), torch.tensor(i)


def test_dataloader_path_draws_the_same_batches_as_the_tensor_path():
    tensor_src = _source(n=10, bs=3)
    loader_src = BatchSource(PlainDataset(10), 3, torch.device("cpu"), seed=0)
    assert loader_src.tensors is None
    for _ in range(7):
        assert torch.equal(tensor_src.next()[1], loader_src.next()[1])


def test_eval_batches_keep_order():
    ds = TensorDataset(torch.zeros(7, 1), torch.arange(7))
    assert torch.cat([y for _, y in eval_batches(ds, 3)]).tolist() == list(range(7))
    assert torch.cat([y for _, y in eval_batches(PlainDataset(7), 3)]).tolist() == list(range(7))



def test_eval_batches_shares_cover_each_sample_once_with_uneven_sizes():
    # torchrun ranks each evaluate one share; padding a share to equal sizes would count samples twice.
    for dataset in (TensorDataset(torch.zeros(7, 1), torch.arange(7)), PlainDataset(7)):
        shares = [torch.cat([y for _, y in eval_batches(dataset, 2, part=(r, 3))]).tolist() for r in range(3)]
        assert [len(s) for s in shares] == [3, 2, 2]
        assert sum(shares, []) == list(range(7))
    # More ranks than samples: the extra ranks get no batch.
    assert [len(list(eval_batches(PlainDataset(2), 4, part=(r, 3)))) for r in range(3)] == [1, 1, 0]

def test_stratified_subsample_keeps_every_class():
    idx = torch.arange(100, 200)
    labels = torch.arange(100) % 10  # 10 per class
    sub = subsample(idx, 0.1, seed=0, labels=labels)
    assert len(sub) == 10
    assert sorted(((sub - 100) % 10).tolist()) == list(range(10))
    assert torch.equal(sub, subsample(idx, 0.1, seed=0, labels=labels))
    assert not torch.equal(sub, subsample(idx, 0.1, seed=1, labels=labels))
    # a class rarer than 1/fraction still keeps one example
    labels[0] = 10
    assert 100 in subsample(idx, 0.1, seed=0, labels=labels).tolist()
