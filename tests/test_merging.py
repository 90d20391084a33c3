"""Model merging (mtl.merging): each method's formula on 2 tasks × 5 entries, by hand."""

import pytest
import torch
from torch import nn

from mtl.config import ConfigError
from mtl.merging import MERGES, Dare, Merged, TaskArithmetic, Ties, build_method, check_coefficients

# Two task vectors τ_1, τ_2 of 5 entries (θ_0 = 0, so θ_t = τ_t).
TAU = torch.tensor([[0.5, -1.0, 0.25, 2.0, -0.125],
                    [-1.5, -0.5, 0.25, 1.0, 0.375]])


def test_task_arithmetic_sums_the_task_vectors():
    assert TaskArithmetic().combine(TAU).tolist() == [-1.0, -1.5, 0.5, 3.0, 0.25]


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    ties = Ties(top_k=0.6)  # keep round(0.6 · 5) = 3 entries per task
    # τ_1 keeps 2.0, -1.0, 0.5; τ_2 keeps -1.5, 1.0, -0.5.
    assert ties.trim(TAU).tolist() == [[0.5, -1.0, 0.0, 2.0, 0.0], [-1.5, -0.5, 0.0, 1.0, 0.0]]
    # Signs of the sums: [-1, -1, 0, +1, 0]. Entry 0: only τ_2's -1.5 agrees -> -1.5; entry 1: both
    # agree -> (-1.0 - 0.5) / 2; entry 3: both -> (2.0 + 1.0) / 2; entries 2 and 4: trimmed away -> 0.
    assert ties.combine(TAU).tolist() == [-1.5, -0.75, 0.0, 1.5, 0.0]


def test_ties_default_keeps_twenty_percent():
    # round(0.2 · 5) = 1 entry per task: τ_1's 2.0 and τ_2's -1.5, on different entries, each alone.
    assert Ties().combine(TAU).tolist() == [-1.5, 0.0, 0.0, 2.0, 0.0]
    # Entries tied in magnitude with the k-th largest are kept: 1 and -1 here.
    assert Ties().trim(torch.tensor([[1.0, -1.0, 0.5, 0.25, 0.125]])).tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0]]


def test_dare_drops_with_its_seeded_mask_and_rescales():
    dare = Dare(drop=0.5, seed=3)
    mask = dare.mask(TAU.shape)
    assert torch.equal(mask, Dare(drop=0.5, seed=3).mask(TAU.shape)) and not torch.equal(mask, Dare(drop=0.5, seed=4).mask(TAU.shape))
    expected = [sum(2.0 * TAU[t, i].item() for t in range(2) if mask[t, i]) for i in range(5)]
    assert dare.combine(TAU).tolist() == pytest.approx(expected)
    assert Dare(drop=0.0).combine(TAU).tolist() == TaskArithmetic().combine(TAU).tolist()
    # The rescaling keeps the expectation: the mean over many masks approaches Σ_t τ_t.
    mean = torch.stack([Dare(drop=0.5, seed=s).combine(TAU) for s in range(2000)]).mean(0)
    assert mean.tolist() == pytest.approx([-1.0, -1.5, 0.5, 3.0, 0.25], abs=0.1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def _state(offset: float) -> dict[str, torch.Tensor]:
    m = Tiny()
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(torch.full_like(p, float(i)) + offset)
    m.bn.running_mean.fill_(offset)
    m.bn.running_var.fill_(1.0 + offset)
    m.bn.num_batches_tracked.fill_(int(10 * offset))
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_merged_trunk_parameters_by_the_formula_buffers_averaged():
    base, a, b = _state(0.0), _state(1.0), _state(3.0)
    names = [n for n, _ in Tiny().named_parameters()]
    merged = Merged(TaskArithmetic(), base, {"a": a, "b": b}, names).at(0.5)
    for n in names:  # θ_0 + 0.5 · ((θ_a − θ_0) + (θ_b − θ_0)) = θ_0 + 0.5 · (1 + 3)
        assert torch.allclose(merged[n], base[n] + 2.0)
    assert merged["bn.running_mean"].tolist() == [2.0, 2.0]  # the mean of 1 and 3, whatever λ
    assert merged["bn.running_var"].tolist() == [3.0, 3.0]
    assert merged["bn.num_batches_tracked"].item() == 0  # the common trunk's counter
    assert set(merged) == set(base)


def test_trunks_of_different_shapes_or_keys_name_the_first_mismatching_key():
    base, other = _state(0.0), _state(1.0)
    wide = dict(other, **{"fc.weight": torch.zeros(3, 2)})
    with pytest.raises(ConfigError, match=r"merge: 'fc.weight' has shape \(3, 2\) in the trunk of b and \(2, 2\) in the common trunk"):
        Merged(TaskArithmetic(), base, {"a": other, "b": wide}, ["fc.weight", "fc.bias"])
    lacking = {k: v for k, v in other.items() if k != "bn.weight"}
    with pytest.raises(ConfigError, match="merge: the trunk of a has no 'bn.weight'"):
        Merged(TaskArithmetic(), base, {"a": lacking}, ["fc.weight"])


def test_methods_are_registered_and_bad_arguments_name_the_key():
    assert MERGES.names() == ["dare", "task_arithmetic", "ties"]
    assert isinstance(build_method("ties", "m"), Ties) and build_method({"name": "ties", "top_k": 0.1}, "m").top_k == 0.1
    with pytest.raises(ConfigError, match=r"compare.regimes.m.method: .*top_k must be in \(0, 1\]"):
        build_method({"name": "ties", "top_k": 20}, "compare.regimes.m.method")
    with pytest.raises(ConfigError, match="compare.regimes.m.method.*Did you mean 'ties'"):
        build_method("tis", "compare.regimes.m.method")
    with pytest.raises(ConfigError, match=r"c\[1\] must be > 0"):
        check_coefficients([0.5, -1], "c")
    with pytest.raises(ConfigError, match="c: a non-empty list"):
        check_coefficients([], "c")
