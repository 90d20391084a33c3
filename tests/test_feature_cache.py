"""The frozen trunk's feature cache (mtl.features): the trunk runs once per input while it is
frozen, never on stale weights, and training gives the same model with and without it."""

import logging

import pytest
import torch

from mtl import features
from mtl.builders import feature_cache_setting
from mtl.config import ConfigError, load_config
from mtl.features import FeatureCache
from mtl.recipes import freeze
from mtl.trainer import Trainer
from mtl.trunks import build_trunk

from conftest import QUICKSTART, quick

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "trainer.batch_size=16",
    *(
        f"tasks.{task}.{key}={value}"
        for task in ("mnist", "digits")
        for key, value in (("train_fraction", 0.05), ("val_fraction", 0.02), ("test_fraction", 0.02))
    ),
]


@pytest.fixture(autouse=True)
def _empty_store():
    features.clear()
    yield
    features.clear()


def _counted_trunk(dropout=0.0):
    """An MLP trunk 4 -> 3 and the number of input rows its first layer has seen."""
    torch.manual_seed(0)
    trunk = build_trunk({"name": "mlp", "in_features": 4, "hidden": [3], "dropout": dropout})
    rows = [0]
    trunk.layers[0][0].register_forward_hook(lambda module, args, out: rows.__setitem__(0, rows[0] + len(args[0])))
    return trunk, rows


def _direct(trunk, x):
    with torch.no_grad():
        return type(trunk).forward(trunk, x)


def test_a_frozen_trunk_runs_once_per_input():
    trunk, rows = _counted_trunk()
    cache = FeatureCache.attach(trunk)
    freeze(trunk)
    x = torch.arange(20.0).view(5, 4)
    first = trunk(x)
    assert rows[0] == 5 and torch.equal(first, _direct(trunk, x))
    rows[0] = 0
    again = trunk(x[[4, 0, 2]])
    assert rows[0] == 0 and torch.equal(again, first[[4, 0, 2]])
    # Two known rows and one new one (given twice): the trunk sees the new row once.
    mixed = torch.cat([x[:2], torch.full((2, 4), 7.0)])
    out = trunk(mixed)
    assert rows[0] == 1 and torch.equal(out, _direct(trunk, mixed))
    assert (cache.hits, cache.misses) == (5, 7)


def test_the_trunk_is_unchanged_for_checkpoints_and_recipes():
    trunk, _ = _counted_trunk()
    keys, groups = list(trunk.state_dict()), trunk.layer_groups()
    FeatureCache.attach(trunk)
    assert list(trunk.state_dict()) == keys and trunk.layer_groups() == groups and not list(trunk.children())[1:]
    FeatureCache.detach(trunk)
    assert "forward" not in trunk.__dict__


@pytest.mark.parametrize("state", ["trainable", "dropout_in_train_mode"])
def test_no_cache_unless_frozen(state):
    trunk, rows = _counted_trunk(dropout=0.5)
    cache = FeatureCache.attach(trunk)
    if state == "trainable":
        trunk.eval()  # weights may still change: no cache
    else:
        trunk.requires_grad_(False)  # frozen weights, but dropout draws new masks
        trunk.train()
    x = torch.ones(3, 4)
    trunk(x)
    trunk(x)
    assert rows[0] == 6 and cache.hits == 0 and not features.STORE.tables


def test_changed_weights_are_never_served_stale_features():
    """LP-FT: features cached while probing; the trunk then fine-tunes (no cache); frozen again,
    it serves the fine-tuned trunk's features. A load_state_dict while frozen does the same."""
    trunk, rows = _counted_trunk()
    FeatureCache.attach(trunk)
    x = torch.randn(4, 4)
    freeze(trunk)
    probed = trunk(x)
    trunk.requires_grad_(True)
    trunk.train()
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.5)
    trunk(x).sum().backward()
    optimizer.step()
    freeze(trunk)
    tuned = trunk(x)
    assert not torch.equal(tuned, probed) and torch.equal(tuned, _direct(trunk, x))
    other = build_trunk({"name": "mlp", "in_features": 4, "hidden": [3]})
    trunk.load_state_dict(other.state_dict())
    assert torch.equal(trunk(x), _direct(other.eval(), x))


def test_features_are_shared_by_trunks_with_the_same_weights_only():
    a, rows_a = _counted_trunk()
    b, rows_b = _counted_trunk()  # same seed: the same weights, as two cells of one pretrained trunk
    for t in (a, b):
        FeatureCache.attach(t)
        freeze(t)
    x = torch.randn(3, 4)
    assert torch.equal(a(x), b(x)) and (rows_a[0], rows_b[0]) == (3, 0)
    with torch.no_grad():
        b.layers[0][0].bias.add_(1.0)
    changed = b(x)
    assert rows_b[0] == 3 and torch.equal(changed, _direct(b, x))


def test_the_cache_switches_off_at_its_memory_budget(caplog):
    trunk, rows = _counted_trunk()
    # Each feature row is 3 float32 = 12 bytes: a 100-byte budget holds 8 rows.
    cache = FeatureCache.attach(trunk, max_mb=100 / 2**20)
    freeze(trunk)
    with caplog.at_level(logging.WARNING, logger="mtl.features"):
        for i in range(3):
            x = torch.full((4, 4), float(i))
            x[:, 0] = torch.arange(4.0)
            assert torch.equal(trunk(x), _direct(trunk, x))
    assert not cache.enabled and "trunk.feature_cache_mb" in caplog.text and not features.STORE.tables
    rows[0] = 0
    trunk(x)
    assert rows[0] == 4  # off for good: the trunk runs


@pytest.mark.parametrize(("value", "key"), [({"feature_cache": "yes"}, "trunk.feature_cache:"), ({"feature_cache_mb": 0}, "trunk.feature_cache_mb:")])
def test_bad_settings_name_the_key(value, key):
    with pytest.raises(ConfigError, match=key):
        feature_cache_setting({"name": "mlp", **value})


def test_settings_leave_the_trunk_node():
    node = {"name": "mlp", "feature_cache": True, "feature_cache_mb": 64}
    assert feature_cache_setting(node) == 64.0 and node == {"name": "mlp"}
    assert feature_cache_setting({"feature_cache": False}) is None


@pytest.mark.parametrize("recipe", ["recipe.name=linear_probe", "recipe.name=lp_ft"])
def test_training_is_bit_identical_with_and_without_the_cache(tmp_path, recipe):
    """The quickstart's trunk and tasks, 2 epochs of 2 steps: the linear probe's second epoch
    (and every evaluation after the first) reads cached features; LP-FT probes for one epoch,
    then fine-tunes with the cache bypassed. Same model, bit for bit, on this CPU."""
    states, caches = {}, {}
    for cache in ("true", "false"):
        features.clear()
        cfg = load_config(QUICKSTART, quick(tmp_path / cache, 2, 2, *SMALL, recipe, f"trunk.feature_cache={cache}"))
        trainer = Trainer(cfg)
        trainer.fit()
        states[cache] = trainer.model.state_dict()
        caches[cache] = trainer.model.trunk.__dict__.get("forward")
    assert caches["false"] is None and caches["true"].misses > 0
    if recipe.endswith("linear_probe"):
        assert caches["true"].hits > 0
    assert all(torch.equal(states["true"][k], states["false"][k]) for k in states["true"])
