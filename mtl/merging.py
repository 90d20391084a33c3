"""Model merging: one trunk from single-task fine-tunes of a common trunk, without training.

Each task t is fine-tuned alone from the common trunk θ_0 to θ_t; its task vector is
τ_t = θ_t − θ_0 (Ilharco et al. 2023). A method combines the task vectors into one vector
τ_m, and the merged trunk is θ = θ_0 + λ τ_m; the comparison (``kind: merge`` in
``mtl.compare``) picks λ on validation and evaluates each task with the merged trunk and its
own fine-tuned head (``evaluate_merged``).

Only floating-point trunk parameters are merged. Buffers are statistics, not directions in
weight space: floating-point ones (BatchNorm's running mean and variance) are the mean over
the fine-tunes, as weight averaging usually treats them; the others (BatchNorm's
``num_batches_tracked`` counter) are the common trunk's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch

from mtl import checks
from mtl.config import ConfigError
from mtl.registry import Registry


class Merge:
    """Base class of merging methods: ``combine(vectors)`` maps the T × N task vectors (one row
    per task, the trunk's floating-point parameters flattened) to the merged vector τ_m of
    θ = θ_0 + λ τ_m. ``coefficients`` is the default λ grid searched on validation."""

    coefficients: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

    def __init__(self) -> None:
        """No arguments; a method that takes some declares them, so a config's keys are checked against them."""

    def combine(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


MERGES: Registry[Merge] = Registry("merge", Merge, builtins=("mtl.merging",))
register_merge = MERGES.register


@register_merge("task_arithmetic")
class TaskArithmetic(Merge):
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): the sum of
    the task vectors, τ_m = Σ_t τ_t with τ_t = θ_t − θ_0, so θ = θ_0 + λ Σ_t τ_t, one λ for all
    tasks chosen on validation."""

    def combine(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.sum(0)


@register_merge("ties")
class Ties(Merge):
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
    Models"): trim each task vector to its ``top_k`` share of entries largest in magnitude
    (τ̂_t; the paper's default 20%), elect each entry's sign γ = sgn(Σ_t τ̂_t), and take the
    disjoint mean over the tasks that agree with it, τ_m = Σ_{t∈A} τ̂_t / |A| with
    A = {t : sgn(τ̂_t) = γ} (0 where A is empty); θ = θ_0 + λ τ_m. τ_m is a mean, not a sum,
    so the λ grid centres on 1 (the paper's value without a validation set)."""

    coefficients = (0.6, 0.8, 1.0, 1.2, 1.4)

    def __init__(self, top_k: float = 0.2):
        self.top_k = checks.number(top_k, "top_k", 0, 1, low_open=True)

    def trim(self, vectors: torch.Tensor) -> torch.Tensor:
        """Each row with its entries smaller in magnitude than its k-th largest set to 0,
        k = round(top_k · N) (at least 1; entries tied with the k-th are kept)."""
        magnitude = vectors.abs()
        keep = max(1, round(self.top_k * vectors.shape[1]))
        # A threshold by kthvalue, not topk's indices: 2-3x faster on a few million entries.
        threshold = magnitude.kthvalue(vectors.shape[1] - keep + 1, dim=1, keepdim=True).values
        return vectors * (magnitude >= threshold)

    def combine(self, vectors: torch.Tensor) -> torch.Tensor:
        trimmed = self.trim(vectors)
        sign = trimmed.sum(0).sign()
        agree = (trimmed.sign() == sign) & (trimmed != 0)
        return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


@register_merge("dare")
class Dare(Merge):
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch"): drop each entry of each task vector with probability
    p (``drop``) and rescale the kept ones by 1/(1 − p), τ̃_t = m_t ⊙ τ_t / (1 − p) with
    m_t ~ Bernoulli(1 − p), then task arithmetic: τ_m = Σ_t τ̃_t. The masks come from a
    generator seeded by ``seed`` (in a comparison, the cell's seed unless set). The paper drops
    up to 90% and finds that larger models tolerate higher rates; the default here, 0.5, is
    milder, for small trunks."""

    def __init__(self, drop: float = 0.5, seed: int = 0):
        self.drop = checks.number(drop, "drop", 0, 1, high_open=True)
        self.seed = checks.number(seed, "seed", integer=True)

    def mask(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """The kept entries m (True with probability 1 − p), the same for the same seed and shape."""
        generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(shape, generator=generator, device=device) >= self.drop

    def combine(self, vectors: torch.Tensor) -> torch.Tensor:
        kept = vectors * self.mask(vectors.shape, vectors.device)
        return kept.sum(0) / (1 - self.drop)


def check_compatible(base: dict[str, torch.Tensor], trunks: dict[str, dict[str, torch.Tensor]]) -> None:
    """A ConfigError naming the first key whose presence or shape differs between the common
    trunk ``base`` and a fine-tuned trunk of ``trunks`` ({name: state dict})."""
    for name, state in trunks.items():
        for key in [*base, *(k for k in state if k not in base)]:
            if key not in state or key not in base:
                where = "the common trunk" if key not in base else f"the trunk of {name}"
                raise ConfigError(
                    f"merge: {where} has no {key!r} (the trunks have different state-dict keys); merging needs fine-tunes "
                    "of one trunk architecture: give every fine-tune the same trunk config."
                )
            if state[key].shape != base[key].shape:
                raise ConfigError(
                    f"merge: {key!r} has shape {tuple(state[key].shape)} in the trunk of {name} and {tuple(base[key].shape)} in the "
                    "common trunk; merging needs fine-tunes of one trunk architecture: give every fine-tune the same trunk config."
                )


class Merged:
    """The fine-tuned ``trunks`` ({task: state dict}) of the common trunk ``base``, combined by
    ``method`` once (``seconds`` says how long that took); ``at(λ)`` is the merged state dict.
    ``parameters``: the names of the trunk's parameters (the rest of the state is buffers)."""

    def __init__(self, method: Merge, base: dict[str, torch.Tensor], trunks: dict[str, dict[str, torch.Tensor]], parameters: Iterable[str]):
        start = time.perf_counter()
        check_compatible(base, trunks)
        parameters = set(parameters)
        self.base = base
        self.names = [k for k in base if k in parameters and base[k].is_floating_point()]
        theta0 = self._flat(base)
        vectors = torch.stack([self._flat(state) - theta0 for state in trunks.values()])
        self.theta0, self.vector = theta0, method.combine(vectors)
        self.buffers = {
            k: torch.stack([s[k].float() for s in trunks.values()]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items() if k not in self.names
        }
        self.seconds = time.perf_counter() - start

    def _flat(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].detach().reshape(-1).float() for k in self.names])

    def at(self, coefficient: float) -> dict[str, torch.Tensor]:
        """θ_0 + λ τ_m for the parameters, with the buffers as the class docstring says."""
        flat = self.theta0 + coefficient * self.vector
        state, offset = {}, 0
        for k in self.names:
            n = self.base[k].numel()
            state[k] = flat[offset : offset + n].view_as(self.base[k]).to(self.base[k].dtype)
            offset += n
        return {k: state[k] if k in state else self.buffers[k] for k in self.base}


def build_method(node: Any, where: str) -> Merge:
    """A method from ``method: ties`` or ``method: {name: ties, top_k: 0.1}``; a ConfigError at ``where``."""
    from mtl.registry import ComponentError, build

    node = {"name": node} if isinstance(node, str) else dict(node or {})
    try:
        return build(MERGES, node, where)
    except ComponentError as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_coefficients(values: Any, where: str) -> list[float]:
    """The λ grid: a non-empty list of distinct finite numbers > 0."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: a non-empty list of scaling coefficients λ, e.g. [0.2, 0.4, 0.6, 0.8, 1.0]; got {values!r}.")
    try:
        grid = [float(checks.number(v, f"{where}[{i}]", 0, low_open=True)) for i, v in enumerate(values)]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(set(grid)) < len(grid):
        raise ConfigError(f"{where}: each coefficient once, got {values}.")
    return grid


# ---- the merge step of a comparison cell ----


def _best_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from mtl import checkpoint

    return checkpoint.load(run_dir / "checkpoints" / "best.pt")["model"]


def evaluate_merged(node: dict[str, Any], coefficients: list[float], base_path: Path, runs: dict[str, Path]) -> dict[str, Any]:
    """Merge the fine-tunes ``runs`` ({task: its run directory}) of the common trunk in
    ``base_path`` by the method ``node`` ({name, **arguments}); pick λ by the mean over tasks
    of the validation primary metric (signed by its direction, ``mtl.results.selection_score``;
    test is never read for it); evaluate every split with that λ. Returns ``{"results",
    "merge", "trunk"}``: a stage's results.json content, what merge.json records (the λ grid
    with each validation score, the chosen λ, the seconds the merge itself took), and the
    merged trunk's state dict."""

    from mtl import checkpoint
    from mtl.builders import build_eval_model, import_plugins, resolve_device
    from mtl.config import load_config
    from mtl.results import directions, evaluate, selection_score

    start = time.perf_counter()
    method = build_method(node, "merge.method")
    configs = {t: load_config(d / "config.yaml") for t, d in runs.items()}
    first = next(iter(configs.values()))
    for cfg in configs.values():
        import_plugins(cfg)
    model, tasks, splits = build_eval_model(first.trunk, {t: configs[t].tasks[t] for t in runs})
    states = {t: _best_state(d) for t, d in runs.items()}
    for t, state in states.items():
        model.heads[t].load_state_dict({k[len(f"heads.{t}.") :]: v for k, v in state.items() if k.startswith(f"heads.{t}.")})
    base = checkpoint.load(base_path)["trunk"]
    trunks = {t: {k[len("trunk.") :]: v for k, v in state.items() if k.startswith("trunk.")} for t, state in states.items()}
    merged = Merged(method, base, trunks, [n for n, _ in model.trunk.named_parameters()])
    device = resolve_device(first.device)
    model.to(device)

    def scores(coefficient: float, split_names: tuple[str, ...]) -> dict[str, Any]:
        model.trunk.load_state_dict(merged.at(coefficient))
        return {s: evaluate(model, tasks, {t: getattr(splits[t], s) for t in tasks}, first.trainer.eval_batch_size, device,
                            num_workers=first.trainer.num_workers) for s in split_names}

    with torch.no_grad():
        grid = [{"coefficient": c, "val_score": selection_score(scores(c, ("val",))["val"], "primary_mean", tasks)} for c in coefficients]
        # The first of equal scores: the smallest λ, the merge closest to the common trunk.
        chosen = max(grid, key=lambda row: (row["val_score"], -row["coefficient"]))["coefficient"]
        splits_out = scores(chosen, ("train", "val", "test"))
    count = sum(p.numel() for p in model.parameters())
    dirs = directions(tasks)
    results = {
        "tasks": {t: {"primary_metric": task.primary_metric, "directions": dirs[t]} for t, task in tasks.items()},
        "splits": splits_out,
        "selected_on": "validation: primary_mean over the λ grid",
        "parameters": {"trainable": count, "total": count},
        "wall_time_s": round(time.perf_counter() - start, 2),
        "device": str(device),
        "processes": 1,
    }
    record = {
        "method": dict(node),
        "common_trunk": str(base_path),
        "common_trunk_sha256": checkpoint.fingerprint(base_path),
        "fine_tunes": {t: str(d) for t, d in runs.items()},
        "coefficients": grid,
        "chosen": chosen,
        "merge_s": merged.seconds,
        "merged_parameters": merged.vector.numel(),
    }
    return {"results": results, "merge": record, "trunk": merged.at(chosen)}
