"""Transfer recipes: what trains in a stage, at which learning rate, with which penalty.

A recipe is called by the trainer at fixed points:
  ``setup(model)`` once, after the model is built and its pretrained weights are loaded;
  ``param_groups(model)`` once, to build the optimizer (each group may carry ``lr_scale``);
  ``start_epoch(model, epoch)`` after ``model.train()`` at each epoch start: sets
    ``requires_grad`` and puts frozen parts in eval mode (BatchNorm statistics frozen);
  ``distinct_epochs(model, epochs)`` to count what trains without visiting every epoch;
  ``penalty(model)`` each step: a term added to the loss, or None.
Frozen parameters stay in the optimizer with ``requires_grad=False``: they get no gradient,
so no optimizer updates them (nor decays them), and a recipe can unfreeze them later.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl import checks
from mtl.model import MultiTaskModel
from mtl.registry import Registry


def freeze(module: nn.Module) -> None:
    """No gradients, and eval mode: BatchNorm running statistics and dropout frozen too."""
    module.requires_grad_(False)
    module.eval()


class Recipe:
    """Base class, and the full fine-tune: every parameter trains at the stage's LR."""

    def setup(self, model: MultiTaskModel) -> None:
        pass

    def param_groups(self, model: MultiTaskModel) -> list[dict]:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        model.requires_grad_(True)

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        """Epochs whose ``start_epoch`` may train another set of parameters than the epochs
        before them; every other epoch repeats one of these. A recipe that overrides
        ``start_epoch`` without this method is asked at every epoch."""
        return range(min(epochs, 1)) if type(self).start_epoch is Recipe.start_epoch else range(epochs)

    def penalty(self, model: MultiTaskModel) -> torch.Tensor | None:
        return None


RECIPES: Registry[Recipe] = Registry("recipe", Recipe)
register_recipe = RECIPES.register


@register_recipe("fine_tune")
class FineTune(Recipe):
    """Full fine-tuning: trunk and heads all train (also training from scratch)."""


@register_recipe("linear_probe")
class LinearProbe(Recipe):
    """Linear probe: trunk frozen (weights and normalization statistics), only the heads train."""

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        model.heads.requires_grad_(True)
        freeze(model.trunk)

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        return range(min(epochs, 1))


@register_recipe("lp_ft")
class LPFT(Recipe):
    """LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): a linear
    probe for ``probe_epochs`` epochs, then full fine-tuning starting from the probed head."""

    def __init__(self, probe_epochs: int = 1):
        self.probe_epochs = checks.number(probe_epochs, "recipe.probe_epochs", 1, integer=True)

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        if epoch < self.probe_epochs:
            LinearProbe().start_epoch(model, epoch)
        else:
            model.requires_grad_(True)

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        return [e for e in (0, self.probe_epochs) if e < epochs]


@register_recipe("gradual_unfreezing")
class GradualUnfreezing(Recipe):
    """Gradual unfreezing (Howard & Ruder 2018, ULMFiT): epoch 0 trains the heads only; every
    ``every`` epochs one more trunk layer group trains, from the last group towards the stem:
    at epoch e the last ⌊e / every⌋ groups are unfrozen."""

    def __init__(self, every: int = 1):
        self.every = checks.number(every, "recipe.every", 1, integer=True)

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        model.heads.requires_grad_(True)
        groups = [m for _, m in model.trunk.layer_groups()]
        thawed = min(epoch // self.every, len(groups))
        # Parameters outside every group thaw with the stem, last of all; modules without
        # parameters (dropout) keep the trunk's train mode throughout.
        for p in model.trunk.parameters():
            p.requires_grad_(thawed == len(groups))
        for i, module in enumerate(groups):
            if i >= len(groups) - thawed:
                module.requires_grad_(True)
                module.train()
            else:
                freeze(module)

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        # One more group every `every` epochs until all of them (and the stem's rest) train.
        return range(0, min(epochs, self.every * len(model.trunk.layer_groups()) + 1), self.every)


@register_recipe("layerwise_lr_decay")
class LayerwiseLRDecay(Recipe):
    """Discriminative fine-tuning / layer-wise LR decay (Howard & Ruder 2018; Clark et al.
    2020): heads train at the LR; trunk layer group i of G (0 = stem) at LR · decay^(G − i),
    so the last group gets LR · decay and the stem LR · decay^G. Trunk parameters in no
    group train at the stem's LR."""

    def __init__(self, decay: float = 0.5):
        self.decay = checks.number(decay, "recipe.decay", 0, 1, low_open=True)

    def param_groups(self, model: MultiTaskModel) -> list[dict]:
        groups = model.trunk.layer_groups()
        n = len(groups)
        out = [{"params": list(model.heads.parameters()), "lr_scale": 1.0, "name": "heads"}]
        seen: set[int] = set()
        for i, (name, module) in enumerate(groups):
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            out.append({"params": params, "lr_scale": self.decay ** (n - i), "name": f"trunk.{name}"})
        rest = [p for p in model.trunk.parameters() if id(p) not in seen]
        if rest:
            out.append({"params": rest, "lr_scale": self.decay**n, "name": "trunk.other"})
        return [g for g in out if g["params"]]


@register_recipe("l2_sp")
class L2SP(Recipe):
    """L2-SP (Li, Grandvalet & Davoine 2018): fine-tune with the penalty
    Ω(w) = α/2 ‖w_S − w_S⁰‖² + β/2 ‖w_H‖², pulling the trunk weights w_S towards the
    pretrained w_S⁰ (not towards zero) and decaying the new head weights w_H. Use it
    without the optimizer's own weight decay."""

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        self.alpha = checks.number(alpha, "recipe.alpha", 0)
        self.beta = checks.number(beta, "recipe.beta", 0)
        self.reference: list[tuple[nn.Parameter, torch.Tensor]] = []

    def setup(self, model: MultiTaskModel) -> None:
        self.reference = [(p, p.detach().clone()) for p in model.trunk.parameters()]

    def penalty(self, model: MultiTaskModel) -> torch.Tensor:
        trunk = sum(((p - p0) ** 2).sum() for p, p0 in self.reference)
        heads = sum((p**2).sum() for p in model.heads.parameters())
        return 0.5 * self.alpha * trunk + 0.5 * self.beta * heads
