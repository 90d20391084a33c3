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

A checkpoint of a stage needs only what its recipe may change (``state_keys``):
``trainable_state(model)`` holds those tensors and a reference to the base trunk (its class,
pretrained weights and a checksum of its state as set up); ``load_trainable_state`` puts them
back into a model built and set up the same way, and refuses another base.

The parameter-efficient recipes (lora, ia3, bitfit, residual_adapters) add adapters to the trunk
in ``setup`` (``mtl.adapters``) and train those and the heads only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtl import adapters, checks
from mtl.config import ConfigError
from mtl.model import MultiTaskModel
from mtl.registry import Registry


def freeze(module: nn.Module) -> None:
    """No gradients, and eval mode: BatchNorm running statistics and dropout frozen too."""
    module.requires_grad_(False)
    module.eval()


def has_statistics(module: nn.Module) -> bool:
    """BatchNorm and the like: buffers a forward pass in train mode updates."""
    return getattr(module, "running_mean", None) is not None


class Recipe:
    """Base class, and the full fine-tune: every parameter trains at the stage's LR."""

    # Freezes, adapts or references the one trunk (``model.trunk``); an architecture built of
    # several trunk copies has none, so only a recipe that sets this False runs on it.
    needs_one_trunk = True

    def setup(self, model: MultiTaskModel) -> None:
        """Subclasses that override it call ``super().setup(model)``: it records the base trunk,
        and the shapes of its state as built, before any adapter (what a stage loads from the last)."""
        if model.trunk is None:  # an architecture of several trunk copies: only the full fine-tune runs on it
            self.base, self.base_shapes = None, {}
            return
        self.base = adapters.base_reference(model.trunk)
        self.base_shapes = {k: tuple(v.shape) for k, v in model.trunk.state_dict().items()}

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

    def state_keys(self, model: MultiTaskModel) -> list[str]:
        """The state-dict keys the stage may change: all of them, unless a recipe knows better."""
        return list(model.state_dict())

    def trainable_state(self, model: MultiTaskModel) -> dict[str, Any]:
        """``{"recipe", "base", "model"}``: the recipe's class, ``base_reference`` of the trunk as
        set up, and a CPU copy of the ``state_keys`` tensors; torch.save-able and readable with
        ``weights_only=True``."""
        if not hasattr(self, "base"):
            raise RuntimeError(f"{type(self).__name__}: call setup(model) first (a setup override must call super().setup(model)).")
        state = model.state_dict()
        return {
            "recipe": type(self).__qualname__,
            "base": self.base,
            "model": {k: state[k].detach().cpu().clone() for k in self.state_keys(model)},
        }

    def load_trainable_state(self, model: MultiTaskModel, checkpoint: dict[str, Any], where: str = "checkpoint") -> None:
        """Load ``trainable_state``'s dict into ``model``, built and set up as the one that
        wrote it: a ConfigError (naming ``where``) for another recipe, base trunk or key set."""
        if not isinstance(checkpoint, dict) or not {"recipe", "base", "model"} <= checkpoint.keys():
            raise ConfigError(f"{where}: not a checkpoint of trained parameters (no recipe, base and model entries).")
        if checkpoint["recipe"] != type(self).__qualname__:
            raise ConfigError(f"{where}: written by recipe {checkpoint['recipe']}, not {type(self).__qualname__}; set recipe.name to match it.")
        base, ours = checkpoint["base"], self.base
        if base["sha256"] != ours["sha256"]:
            raise ConfigError(
                f"{where}: trained on another base trunk ({base['trunk']}, weights {base['weights']}, sha256 {base['sha256'][:12]}) "
                f"than this one ({ours['trunk']}, weights {ours['weights']}, sha256 {ours['sha256'][:12]}); build the trunk it was trained on."
            )
        expected, saved = self.state_keys(model), set(checkpoint["model"])
        missing, unexpected = [k for k in expected if k not in saved], sorted(saved - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"{where}: its keys are not the ones this recipe trains (missing: {', '.join(missing[:5]) or 'none'}; "
                f"unexpected: {', '.join(unexpected[:5]) or 'none'}); build the model with the recipe arguments it was written with."
            )
        own = model.state_dict()
        misfit = [f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})" for k, v in checkpoint["model"].items() if v.shape != own[k].shape]
        if misfit:
            raise ConfigError(f"{where}: shapes differ from this model's: {'; '.join(misfit[:5])}; build the model with the recipe arguments it was written with.")
        model.load_state_dict(checkpoint["model"], strict=False)


RECIPES: Registry[Recipe] = Registry("recipe", Recipe)
register_recipe = RECIPES.register


@register_recipe("fine_tune")
class FineTune(Recipe):
    """Full fine-tuning: trunk and heads all train (also training from scratch)."""

    needs_one_trunk = False


@register_recipe("linear_probe")
class LinearProbe(Recipe):
    """Linear probe: trunk frozen (weights and normalization statistics), only the heads train."""

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        model.heads.requires_grad_(True)
        freeze(model.trunk)

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        return range(min(epochs, 1))

    def state_keys(self, model: MultiTaskModel) -> list[str]:
        return [k for k in model.state_dict() if k.startswith("heads.")]


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
        super().setup(model)
        self.reference = [(p, p.detach().clone()) for p in model.trunk.parameters()]

    def penalty(self, model: MultiTaskModel) -> torch.Tensor:
        trunk = sum(((p - p0) ** 2).sum() for p, p0 in self.reference)
        heads = sum((p**2).sum() for p in model.heads.parameters())
        return 0.5 * self.alpha * trunk + 0.5 * self.beta * heads


# -- parameter-efficient recipes ----------------------------------------------------------


class AdapterRecipe(Recipe):
    """Base of the parameter-efficient recipes: ``adapt(trunk)`` adds adapter modules to the
    trunk and returns the trunk's own parameters that train too; the new parameters, those and
    the heads are all that train. The rest of the trunk stays as set up: its weights, and the
    statistics of its normalisation layers (in eval mode unless all their parameters train);
    its dropout keeps the trunk's train mode."""

    def adapt(self, trunk: nn.Module) -> list[nn.Parameter]:
        raise NotImplementedError

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        before = {id(p) for p in model.trunk.parameters()}
        own = {id(p) for p in self.adapt(model.trunk)}
        self.trained = [n for n, p in model.trunk.named_parameters() if id(p) in own or id(p) not in before]

    def _updating(self, model: MultiTaskModel) -> list[str]:
        """Names of the trunk modules with statistics whose parameters all train."""
        trained = set(self.trained)
        return [
            name for name, m in model.trunk.named_modules()
            if has_statistics(m) and any(True for _ in m.parameters(recurse=False))
            and all(f"{name}.{n}" in trained for n, _ in m.named_parameters(recurse=False))
        ]

    def start_epoch(self, model: MultiTaskModel, epoch: int) -> None:
        model.requires_grad_(False)
        model.heads.requires_grad_(True)
        for name in self.trained:
            model.trunk.get_parameter(name).requires_grad_(True)
        updating = set(self._updating(model))
        for name, m in model.trunk.named_modules():
            if has_statistics(m) and name not in updating:
                m.eval()

    def distinct_epochs(self, model: MultiTaskModel, epochs: int) -> range | list[int]:
        return range(min(epochs, 1))

    def state_keys(self, model: MultiTaskModel) -> list[str]:
        statistics = {f"{m}.{b}" for m in self._updating(model) for b, _ in model.trunk.get_submodule(m).named_buffers(recurse=False)}
        keep = {f"trunk.{n}" for n in (*self.trained, *statistics)}
        return [k for k in model.state_dict() if k.startswith("heads.") or k in keep]


def _no_layers(trunk: nn.Module, recipe: str, what: str) -> ConfigError:
    return ConfigError(f"recipe: {recipe} adapts {what}, and this trunk ({type(trunk).__name__}) has none; choose another recipe (`mtl list recipes`).")


@register_recipe("lora")
class LoRA(AdapterRecipe):
    """LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") through
    peft: each targeted layer's frozen weight W (a Conv2d's as out × in·kh·kw) becomes
    W + (α / r) · B A, with A of rank ``rank`` r (random) and B zero at the start, so the
    trunk starts as set up; A, B and the heads train. Targets: ``target_modules`` (a regular
    expression over the whole module name, or a list of names; default every Linear and
    ungrouped Conv2d of the trunk; the paper adapts attention's query and value:
    '.*\\.(query|value)' on minilm). ``alpha`` α; ``dropout`` on the adapter's input."""

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, target_modules: str | Sequence[str] | None = None):
        self.rank = checks.number(rank, "recipe.rank", 1, integer=True)
        self.alpha = checks.number(alpha, "recipe.alpha", 0, low_open=True)
        self.dropout = checks.probability(dropout, "recipe.dropout")
        self.target_modules = adapters.check_patterns(target_modules, "recipe.target_modules")
        adapters.require_peft("lora")

    def adapt(self, trunk: nn.Module) -> list[nn.Parameter]:
        import peft

        what = "Linear and ungrouped Conv2d layers"
        candidates = adapters.layers(trunk, adapters.dense_linear_or_conv)
        if not candidates:
            raise _no_layers(trunk, "lora", what)
        names = adapters.select(candidates, self.target_modules, "recipe.target_modules", what)
        small = [f"{n} ({adapters.describe(candidates[n])}: rank at most {adapters.max_rank(candidates[n])})"
                 for n in names if adapters.max_rank(candidates[n]) < self.rank]
        if small:
            raise ConfigError(
                f"recipe.rank: {self.rank} is larger than the rank of {len(small)} targeted layer(s): {'; '.join(small)}. "
                "Lower recipe.rank, or leave those layers out of recipe.target_modules."
            )
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=adapters.exact(names))
        adapters.inject(trunk, config)
        return []


@register_recipe("ia3")
class IA3(AdapterRecipe):
    """(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
    than In-Context Learning") through peft: learned vectors l, started at 1, rescale each
    targeted layer's output, l ⊙ (W x), or for ``feedforward_modules`` its input, W (l ⊙ x);
    the vectors and the heads train. The paper rescales attention's keys and values and the
    feed-forward block's inner activations: on minilm, target_modules '.*\\.(key|value)|.*\\.[0-9]+\\.output\\.dense'
    with feedforward_modules '.*\\.[0-9]+\\.output\\.dense'. Default: the outputs of every
    Linear and Conv2d layer of the trunk."""

    def __init__(self, target_modules: str | Sequence[str] | None = None, feedforward_modules: str | Sequence[str] | None = None):
        self.target_modules = adapters.check_patterns(target_modules, "recipe.target_modules")
        self.feedforward_modules = adapters.check_patterns(feedforward_modules, "recipe.feedforward_modules")
        adapters.require_peft("ia3")

    def adapt(self, trunk: nn.Module) -> list[nn.Parameter]:
        import peft

        what = "Linear and Conv2d layers"
        candidates = adapters.layers(trunk, adapters.linear_or_conv)
        if not candidates:
            raise _no_layers(trunk, "ia3", what)
        names = adapters.select(candidates, self.target_modules, "recipe.target_modules", what)
        feedforward = []
        if self.feedforward_modules is not None:
            targeted = {n: candidates[n] for n in names}
            feedforward = adapters.select(targeted, self.feedforward_modules, "recipe.feedforward_modules", "targeted layers (recipe.target_modules)")
        config = peft.IA3Config(target_modules=adapters.exact(names), feedforward_modules=adapters.exact(feedforward))
        adapters.inject(trunk, config)
        return []


@register_recipe("bitfit")
class BitFit(AdapterRecipe):
    """BitFit (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient
    Fine-tuning for Transformer-based Masked Language-models"): only the trunk's bias terms b
    of every layer (W x + b, normalisation layers' β included) and the heads train."""

    def adapt(self, trunk: nn.Module) -> list[nn.Parameter]:
        biases = [p for n, p in trunk.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if not biases:
            raise ConfigError(f"recipe: bitfit trains the trunk's biases, and this trunk ({type(trunk).__name__}) has none; "
                              "use linear_probe to train the heads only, or lora.")
        return biases


@register_recipe("residual_adapters")
class ResidualAdapters(AdapterRecipe):
    """Residual adapters (Rebuffi, Bilen & Vedaldi 2017, "Learning multiple visual domains with
    residual adapters"), series form: after each targeted convolution, y ↦ y + W ∗ BN(y) with
    W a 1×1 convolution C → C, started at zero (``mtl.adapters.ResidualAdapter``). The
    adapters, the trunk's BatchNorm layers (task-specific in the paper: weights and
    statistics) and the heads train. Targets: ``target_modules`` as lora's, among the Conv2d
    layers with kernels larger than 1×1; default the ungrouped ones (the paper's 3×3
    convolutions; depthwise ones only in a trunk that has no other)."""

    def __init__(self, target_modules: str | Sequence[str] | None = None):
        self.target_modules = adapters.check_patterns(target_modules, "recipe.target_modules")

    def adapt(self, trunk: nn.Module) -> list[nn.Parameter]:
        what = "Conv2d layers with kernels larger than 1×1"
        candidates = adapters.layers(trunk, adapters.spatial_conv)
        if not candidates:
            raise _no_layers(trunk, "residual_adapters", what)
        if self.target_modules is None:
            # A depthwise conv's adapter (C² weights) would outweigh the conv (9C): by default
            # adapters follow the standard convolutions, as in the paper's ResNets.
            names = [n for n, m in candidates.items() if m.groups == 1] or list(candidates)
        else:
            names = adapters.select(candidates, self.target_modules, "recipe.target_modules", what)
        norms = [m for m in trunk.modules() if has_statistics(m)]
        adapters.add_residual_adapters(trunk, names)
        return [p for m in norms for p in m.parameters(recurse=False)]
