"""Argument checks of the components' constructors, and what a recipe trains counted without
visiting every epoch."""

import math

import pytest
from torch import nn

from mtl import checks
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.recipes import RECIPES, Recipe
from mtl.trunks import TRUNKS


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (True, {"low": 0}, r"x must be >= 0 \(a finite number\), got True"),
        (math.inf, {"low": 0, "low_open": True}, r"x must be > 0 \(a finite number\), got inf"),
        (math.nan, {"low": 0, "high": 1}, r"x must be in \[0, 1\] \(a finite number\), got nan"),
        (1.0, {"low": 1, "integer": True}, r"x must be >= 1 \(an integer\), got 1.0"),
        (1, {"low": 0, "high": 1, "high_open": True}, r"x must be in \[0, 1\)"),
        ("0.5", {"low": 0}, r"x must be >= 0 \(a finite number\), got '0.5'"),
    ],
)
def test_number_names_the_argument_its_range_and_the_value(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        checks.number(value, "x", **kwargs)


def test_sizes():
    assert checks.sizes([3, 4], "h") == [3, 4]
    assert checks.sizes([], "h", allow_empty=True) == []
    for bad, message in (([], "h must list layer sizes"), ("64", "h must list layer sizes"), ([4, 0], r"h\[1\] must be >= 1"), ([True], r"h\[0\] must be >= 1")):
        with pytest.raises(ValueError, match=message):
            checks.sizes(bad, "h")


class EveryOtherEpoch(Recipe):
    """A user's recipe that overrides start_epoch only: asked at every epoch."""

    def start_epoch(self, model, epoch):
        model.requires_grad_(True)
        model.trunk.requires_grad_(epoch % 2 == 1)


RECIPE_NODES = [{"name": n} for n in RECIPES.names()] + [{"name": "lp_ft", "probe_epochs": 3}, {"name": "gradual_unfreezing", "every": 2}]


@pytest.mark.parametrize("node", RECIPE_NODES + [{"name": f"{__name__}:EveryOtherEpoch"}], ids=lambda n: "-".join(map(str, n.values())))
@pytest.mark.parametrize("epochs", [1, 3, 7])
def test_distinct_epochs_train_what_every_epoch_trains(node, epochs):
    node = dict(node)
    recipe = RECIPES.get(node.pop("name"))(**node)
    trunk = TRUNKS.get("seed_net")()  # convs and a linear layer: every recipe has layers to adapt
    model = MultiTaskModel(trunk, nn.ModuleDict({"a": LinearHead((50,), 2)}))
    recipe.setup(model)  # as the trainer does: adapters exist before any epoch starts

    def trained(epoch_list):
        seen = set()
        for epoch in epoch_list:
            recipe.start_epoch(model, epoch)
            seen |= {name for name, p in model.named_parameters() if p.requires_grad}
        return seen

    distinct = list(recipe.distinct_epochs(model, epochs))
    assert len(distinct) <= epochs and all(0 <= e < epochs for e in distinct)
    assert trained(distinct) == trained(range(epochs))


def test_distinct_epochs_do_not_grow_with_the_run():
    model = MultiTaskModel(TRUNKS.get("mlp")(in_features=4, hidden=[3]), nn.ModuleDict({"a": LinearHead((3,), 2)}))
    for node in RECIPE_NODES:
        node = dict(node)
        recipe = RECIPES.get(node.pop("name"))(**node)
        assert len(recipe.distinct_epochs(model, 10**12)) <= 5
