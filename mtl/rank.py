"""`mtl rank CONFIG`: transferability scores of candidate source trunks for each target task, from
one forward pass of the target's training data (no training). Prints a table per target and
writes ``rank.csv`` (one row per target, candidate and score) and ``rank.md`` in ``output_dir``.

The config is an ordinary run config (its tasks, trunk, seed and device) with a ``rank`` node:

    rank:
      targets: [digits]            # default: compare.targets, else every task
      max_samples: 500             # target training samples scored (a seeded draw)
      batch_size: 256              # forward-pass batch
      scores: [logme, leep, nce, hscore, transrate]   # default: every score (`mtl list scores`)
      candidates:                  # label -> one of:
        random_init: {}                                # {trunk: {...}}: the config's trunk, with these keys set
        imagenet: {trunk: {name: efficientnet_lite0, weights: imagenet, image_size: 64}}
        mnist: {run: runs/mnist_source}                # a finished training run: its selected trunk and heads
        quickstart: {comparison: runs/quickstart}      # every seed's source stage of a comparison

A candidate with a source classifier (a run's classification heads, or a pretrained classifier's
own head, e.g. EfficientNet-Lite0's ImageNet head) gives LEEP and NCE; without one they are "not
applicable", as are classification-only scores on a regression target. Every candidate is built
and checked against every target's inputs before anything is scored, so a bad path, an unknown
score or a trunk that cannot take a target's inputs is one error naming its key, early.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.config import ConfigError, read_yaml, resolve, to_dict
from mtl.registry import ComponentError, did_you_mean
from mtl.transferability import CLASSIFICATION, REGRESSION, SCORES, TransferabilityScore

RANK_KEYS = ("candidates", "targets", "scores", "max_samples", "batch_size", "validate")
VALIDATE_KEYS = ("measures", "fraction", "split", "resamples")
CANDIDATE_KEYS = ("trunk", "run", "comparison")
DEFAULT_MAX_SAMPLES = 1000
DEFAULT_BATCH_SIZE = 256


# ---- the config -----------------------------------------------------------------------------


def _top_key(override: str) -> str:
    return override.lstrip("~").split("=")[0].split(".")[0].split("[")[0].strip()


def load(path: str, overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, Any]]:
    """The run config (checked as `mtl train` checks it) and the ``rank`` node, each with its
    overrides applied (``rank.max_samples=200``, ``~rank.candidates.mnist``)."""
    raw = read_yaml(path)
    node = raw.pop("rank", None)
    mine = [o for o in overrides if _top_key(o) == "rank"]
    try:
        cfg = resolve(raw, [o for o in overrides if _top_key(o) != "rank"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    rank = OmegaConf.create({"rank": node})
    for item in mine:
        try:
            if item.startswith("~"):
                parent, _, leaf = item[1:].rpartition(".")
                holder = OmegaConf.select(rank, parent, default=None)
                if not isinstance(holder, DictConfig) or leaf not in holder:
                    raise ConfigError(f"{item}: no such key to delete.")
                del holder[leaf]
            else:
                # As `mtl train` applies overrides: a mapping merges into a mapping, anything else replaces
                # (a list given for a mapping is then reported by the checks with its key).
                key = item.partition("=")[0].strip()
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
                merge = isinstance(value, DictConfig) and isinstance(OmegaConf.select(rank, key, default=None), DictConfig)
                OmegaConf.update(rank, key, value, merge=merge)
        except (OmegaConfBaseException, ValueError, TypeError) as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}; write rank.KEY=VALUE, e.g. rank.max_samples=200.") from None
    node = OmegaConf.to_container(rank, resolve=True).get("rank")  # ~rank deletes the node
    if node is not None and not isinstance(node, dict):
        raise ConfigError(f"{path}: rank: must be a mapping ({', '.join(RANK_KEYS)}), got {node!r}.")
    return cfg, node or {}


@dataclass
class Settings:
    targets: list[str]
    candidates: dict[str, dict[str, Any]]
    scores: dict[str, TransferabilityScore]
    max_samples: int
    batch_size: int
    validation: Validation | None = None


def settings(cfg: DictConfig, node: dict[str, Any]) -> Settings:
    """The rank node checked: each problem is one error naming its key and the fix."""
    for key in node:
        if key not in RANK_KEYS:
            raise ConfigError(f"rank.{key}: unknown key.{did_you_mean(str(key), RANK_KEYS)} Valid keys here: {', '.join(RANK_KEYS)}.")
    candidates = node.get("candidates")
    if not isinstance(candidates, dict) or not candidates:
        raise ConfigError(
            "rank.candidates: name at least one candidate source, e.g. rank.candidates={random_init: {}, mnist: {run: runs/mnist_source}} "
            f"(each one of: {', '.join(CANDIDATE_KEYS)}); got {candidates!r}."
        )
    for label, cand in candidates.items():
        _check_candidate(str(label), cand)
    targets = node.get("targets")
    if targets is None:
        targets = list(cfg.compare.targets) or list(cfg.tasks)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"rank.targets: must be a list of task names, e.g. [{next(iter(cfg.tasks))}], got {targets!r}.")
    for t in targets:
        if t not in cfg.tasks:
            raise ConfigError(f"rank.targets: task {t!r} is not defined under tasks.{did_you_mean(t, cfg.tasks)} Defined: {', '.join(cfg.tasks)}.")
    return Settings(
        targets=list(dict.fromkeys(targets)),
        candidates={str(k): dict(v or {}) for k, v in candidates.items()},
        scores=build_scores(node.get("scores")),
        max_samples=_count(node.get("max_samples", DEFAULT_MAX_SAMPLES), "rank.max_samples", 2),
        batch_size=_count(node.get("batch_size", DEFAULT_BATCH_SIZE), "rank.batch_size", 1),
        validation=None if node.get("validate") is None else Validation.from_node(node["validate"], list(candidates), targets),
    )


def _count(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}: must be a whole number >= {low}, got {value!r}.")
    return value


def _check_candidate(label: str, cand: Any) -> None:
    where = f"rank.candidates.{label}"
    if cand is None:
        return
    if not isinstance(cand, dict):
        raise ConfigError(f"{where}: must be a mapping with one of {', '.join(CANDIDATE_KEYS)} (or {{}} for the config's trunk), got {cand!r}.")
    for key in cand:
        if key not in CANDIDATE_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key.{did_you_mean(str(key), CANDIDATE_KEYS)} A candidate takes one of: {', '.join(CANDIDATE_KEYS)}.")
    if len(cand) > 1:
        raise ConfigError(f"{where}: give one of {', '.join(cand)}, not several (a candidate is one trunk, one run or one comparison).")
    if "trunk" in cand and not isinstance(cand["trunk"], dict):
        raise ConfigError(f"{where}.trunk: must be a mapping of trunk keys, e.g. {{checkpoint: runs/x/trunk.pt}}, got {cand['trunk']!r}.")
    for key in ("run", "comparison"):
        if key in cand and (not isinstance(cand[key], str) or not cand[key].strip()):
            raise ConfigError(f"{where}.{key}: must be a directory path, got {cand[key]!r}.")


def build_scores(nodes: Any) -> dict[str, TransferabilityScore]:
    """Scores by name, in the order given; every registered score when ``nodes`` is None."""
    from mtl.registry import build

    if nodes is None:
        nodes = SCORES.names()
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError(f"rank.scores: must be a list of score names (`mtl list scores`: {', '.join(SCORES.names())}), got {nodes!r}.")
    scores: dict[str, TransferabilityScore] = {}
    for i, node in enumerate(nodes):
        where = f"rank.scores[{i}]"
        node = {"name": node} if isinstance(node, str) else node
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise ConfigError(f"{where}: must be a score name or {{name: ..., **arguments}} (`mtl list scores`), got {node!r}.")
        if node["name"] in scores:
            raise ConfigError(f"{where}: {node['name']} is listed twice; list each score once.")
        try:
            scores[node["name"]] = build(SCORES, node, where)
        except ComponentError as e:
            message = str(e)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return scores


# ---- validation against measured transfer ---------------------------------------------------


@dataclass
class Validation:
    """Each score's rank correlation with the transfer `mtl compare` measured from the same
    candidates (those the score applies to, at least 3): the weighted Kendall τ (scipy.stats.weightedtau, as LogME's paper reports it)
    between the candidates' scores and their mean primary test metric over seeds, with a
    percentile bootstrap CI over seeds (the seeds resampled alike for every candidate: a seed
    fixes a comparison's labelled subset and initialisation).

    ``measured[measure][candidate]`` is a comparison's long-form results (its results.csv) and
    the method whose metric counts, e.g. sequential/fine_tune for a source, single_task for
    random initialisation."""

    measured: dict[str, dict[str, tuple[Any, str]]]  # measure -> candidate -> (results DataFrame, method)
    fraction: float
    split: str
    resamples: int

    @classmethod
    def from_node(cls, node: Any, candidates: list[str], targets: list[str]) -> Validation:
        import pandas as pd

        where = "rank.validate"
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: must be a mapping ({', '.join(VALIDATE_KEYS)}), got {node!r}.")
        for key in node:
            if key not in VALIDATE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key.{did_you_mean(str(key), VALIDATE_KEYS)} Valid keys here: {', '.join(VALIDATE_KEYS)}.")
        fraction, split = node.get("fraction", 1.0), node.get("split", "test")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"{where}.fraction: the labelled fraction whose results count, in (0, 1], got {fraction!r}.")
        if split not in ("train", "val", "test"):
            raise ConfigError(f"{where}.split: train, val or test, got {split!r}.")
        measures = node.get("measures")
        if not isinstance(measures, dict) or not measures:
            raise ConfigError(
                f"{where}.measures: name at least one measure, e.g. {{fine_tune: {{mnist: runs/quickstart, random_init: "
                "{results: runs/quickstart, method: single_task}}}}; got " + f"{measures!r}."
            )
        measured: dict[str, dict[str, tuple[Any, str]]] = {}
        for measure, by_candidate in measures.items():
            mwhere = f"{where}.measures.{measure}"
            if not isinstance(by_candidate, dict) or len(by_candidate) < 3:
                raise ConfigError(f"{mwhere}: map at least 3 candidates to their comparisons (a rank correlation of 2 is ±1 whatever the scores); got {by_candidate!r}.")
            measured[str(measure)] = {}
            for label, spec in by_candidate.items():
                cwhere = f"{mwhere}.{label}"
                if label not in candidates:
                    raise ConfigError(f"{cwhere}: {label!r} is not a candidate.{did_you_mean(str(label), candidates)} Candidates: {', '.join(candidates)}.")
                spec = {"results": spec} if isinstance(spec, str) else spec
                if not isinstance(spec, dict) or not isinstance(spec.get("results"), str) or set(spec) - {"results", "method"}:
                    raise ConfigError(f"{cwhere}: a comparison's output_dir (or its results.csv), or {{results: PATH, method: single_task}}; got {spec!r}.")
                path = Path(spec["results"])
                path = path / "results.csv" if path.is_dir() else path
                if not path.is_file():
                    raise ConfigError(f"{cwhere}: no results file {path}; run the comparison first (mtl compare CONFIG) or fix the path.")
                df = pd.read_csv(path)
                method = spec.get("method", f"sequential/{measure}")
                for target in targets:
                    rows = df[(df["method"] == method) & (df["task"] == target) & (df["split"] == split) & df["primary"] & (df["fraction"] == fraction)]
                    if rows.empty:
                        methods = sorted(df["method"].unique())
                        raise ConfigError(
                            f"{cwhere}: {path} has no {split} result of method {method!r} for task {target} at fraction {fraction:g} "
                            f"(its methods: {', '.join(methods)}); set {cwhere}.method or rank.validate.fraction."
                        )
                measured[str(measure)][str(label)] = (df, method)
        return cls(measured, float(fraction), split, _count(node.get("resamples", 2000), f"{where}.resamples", 100))

    def per_seed(self, df: Any, method: str, target: str) -> Any:
        """The method's primary metric on ``target`` per seed, signed so that higher is better."""
        rows = df[(df["method"] == method) & (df["task"] == target) & (df["split"] == self.split) & df["primary"] & (df["fraction"] == self.fraction)]
        # `mtl compare` writes a metric's direction as max (higher is better) or min.
        sign = rows["direction"].map({"max": 1.0, "min": -1.0})
        if sign.isna().any():
            bad = sorted(set(rows["direction"][sign.isna()].astype(str)))
            raise ConfigError(f"rank.validate: results of {method!r} on {target} have direction {', '.join(bad)}; "
                              "a results.csv of `mtl compare` says max or min.")
        return (rows["value"] * sign).groupby(rows["seed"]).mean()

    def table(self, scores: Any, seed: int) -> Any:
        """One row per target, measure and score: τ_w, its bootstrap CI and a verdict."""
        import pandas as pd
        import scipy.stats

        rows = []
        rng = np.random.default_rng(seed)
        for target in scores["target"].unique():
            for measure, by_candidate in self.measured.items():
                values = {label: self.per_seed(df, method, target) for label, (df, method) in by_candidate.items()}
                seeds = sorted(set.intersection(*(set(v.index) for v in values.values())))
                if not seeds:
                    raise ConfigError(f"rank.validate.measures.{measure}: its comparisons share no seed for task {target}; pair them by running the same seeds.")
                measured = np.array([[values[label][s] for s in seeds] for label in by_candidate])  # [candidates, seeds]
                draws = rng.integers(0, len(seeds), size=(self.resamples, len(seeds)))
                for name, rows_of_score in scores[scores["target"] == target].groupby("score", sort=False):
                    # A comparison candidate's source stages (label/seedK) score as their mean.
                    base = rows_of_score["candidate"].str.replace(r"/seed\d+$", "", regex=True)
                    value = rows_of_score.groupby(base)["value"].mean()
                    x = np.array([value.get(label, np.nan) for label in by_candidate])
                    # Over the candidates the score applies to (LEEP and NCE need a source classifier,
                    # which a random trunk lacks): a correlation of fewer than 3 says nothing.
                    scored = ~np.isnan(x)
                    x, m = x[scored], measured[scored]
                    row = {"target": target, "measure": measure, "score": name, "candidates": len(x), "seeds": len(seeds)}
                    if len(x) < 3:
                        rows.append({**row, "tau_w": math.nan, "ci_low": math.nan, "ci_high": math.nan, "verdict": "not applicable"})
                        continue
                    tau = scipy.stats.weightedtau(x, m.mean(1)).statistic
                    if len(seeds) < 2:
                        low = high = math.nan
                    else:
                        boot = np.array([scipy.stats.weightedtau(x, m[:, d].mean(1)).statistic for d in draws])
                        low, high = np.nanpercentile(boot, [2.5, 97.5])
                    verdict = ("not resolved (one seed, no CI)" if math.isnan(low) else
                               "agrees" if low > 0 else "disagrees" if high < 0 else "not resolved")
                    rows.append({**row, "tau_w": tau, "ci_low": low, "ci_high": high, "verdict": verdict})
        return pd.DataFrame(rows)


def validation_markdown(df: Any, v: Validation) -> str:
    lines = [
        f"### Scores against measured transfer ({v.split} primary metric at fraction {v.fraction:g})", "",
        "| target | measure | score | τ_w | 95% CI (bootstrap over seeds) | verdict | candidates | seeds |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        ci = "—" if math.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        tau = "n/a" if math.isnan(r.tau_w) else f"{r.tau_w:.2f}"
        lines.append(f"| {r.target} | {r.measure} | {r.score} | {tau} | {ci} | {r.verdict} | {r.candidates} | {r.seeds} |")
    lines += ["", "τ_w: weighted Kendall τ (scipy.stats.weightedtau) between the scores and the mean measured metric; "
              "'agrees' when the CI lies above 0, 'disagrees' below, else 'not resolved'."]
    return "\n".join(lines)


# ---- targets --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    kind: str | None  # classification | regression | None (no score is defined for its targets)
    note: str  # why no score applies, when kind is None
    inputs: Any  # torch.Tensor [N, ...]: the scored training inputs
    labels: np.ndarray  # [N] class indices or [N, K] real values


def load_targets(cfg: DictConfig, s: Settings) -> list[Target]:
    """Each target's training split, at most ``max_samples`` of it (a draw fixed by ``cfg.seed``),
    its unlabelled samples dropped."""
    import torch
    from torch.utils.data import Subset

    from mtl.builders import build_tasks, import_plugins, load_datasets
    from mtl.data import eval_batches

    import_plugins(cfg)
    part = cfg.copy()
    part.tasks = {name: cfg.tasks[name] for name in s.targets}
    tasks, _ = build_tasks(part)
    splits = load_datasets(tasks)
    targets = []
    for name, task in tasks.items():
        train = splits[name].train
        order = np.random.default_rng(cfg.seed).permutation(len(train))[: s.max_samples]
        batches = list(eval_batches(Subset(train, order.tolist()), s.batch_size))
        x, y = (torch.cat([b[i] for b in batches]) for i in (0, 1))
        keep = task.valid_mask(y)
        x, y = x[keep], y[keep]
        if len(y) < 2:
            raise ConfigError(f"tasks.{name}: {len(y)} labelled training samples among the {len(order)} drawn; scoring needs at least 2 (raise rank.max_samples).")
        kind, note = _kind(task, y)
        labels = y.numpy().astype(np.int64 if kind == CLASSIFICATION else np.float64)
        targets.append(Target(name, kind, note, x, labels.reshape(len(y), -1) if kind == REGRESSION else labels))
    return targets


def _kind(task: Any, y: Any) -> tuple[str | None, str]:
    from mtl.task import ClassificationTask, MultiLabelTask, RegressionTask

    if isinstance(task, ClassificationTask) and y.dim() == 1:
        return CLASSIFICATION, ""
    # A multi-label target's 0/1 labels are real-valued columns to LogME, as a class indicator is.
    if isinstance(task, (RegressionTask, MultiLabelTask)) and y.dim() <= 2:
        return REGRESSION, ""
    return None, f"{type(task).__name__} targets of shape {tuple(y.shape[1:])} per sample: no score here is defined for them"


# ---- candidates -----------------------------------------------------------------------------


@dataclass
class Candidate:
    label: str
    where: str  # its config key
    trunk: Any  # mtl.trunks.Trunk
    source: Callable[[Any], Any] | None  # raw trunk features -> source class probabilities [N, C_s], or why not
    source_note: str  # what the source classifier is, or why there is none
    load_s: float


def merged_trunk(base: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A candidate's trunk node: one that names another trunk replaces the config's node; keys
    alone set arguments of the config's trunk."""
    return dict(node) if node.get("name", base["name"]) != base["name"] else {**base, **node}


def expand(candidates: dict[str, dict[str, Any]], base_trunk: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, config key, node) per candidate; a comparison gives one per seed's source stage.
    Every path is checked here, before any trunk is built."""
    out = []
    for label, cand in candidates.items():
        where = f"rank.candidates.{label}"
        if "comparison" in cand:
            root = Path(cand["comparison"])
            stages = sorted((root / "sources").glob("seed*"), key=lambda p: (len(p.name), p.name))
            if not stages:
                raise ConfigError(
                    f"{where}.comparison: {root} holds no source stages (sources/seed*/); give the output_dir of an `mtl compare` "
                    "with a sequential regime, run after it has trained (e.g. mtl compare configs/quickstart.yaml, then comparison: runs/quickstart)."
                )
            for stage in stages:
                _check_run(stage, f"{where}.comparison")
                out.append((f"{label}/{stage.name}", f"{where}.comparison", {"run": str(stage)}))
        elif "run" in cand:
            _check_run(Path(cand["run"]), f"{where}.run")
            out.append((label, f"{where}.run", cand))
        else:
            own = cand.get("trunk") or {}
            checkpoint = merged_trunk(base_trunk, own).get("checkpoint")
            key = f"{where}.trunk.checkpoint" if "checkpoint" in own else "trunk.checkpoint"
            if checkpoint and not Path(str(checkpoint)).is_file():
                raise ConfigError(
                    f"{key}: file not found: {checkpoint} (relative paths start from {Path.cwd()}). "
                    f"Fix the path in {key} (a trunk.pt or checkpoints/best.pt of a run)."
                )
            out.append((label, f"{where}.trunk", cand))
    return out


RUN_FILES = ("config.yaml", "checkpoints/best.pt", "results.json")  # results.json is written when a run ends


def _check_run(run: Path, where: str) -> None:
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if not run.is_dir() or missing:
        what = "no such directory" if not run.is_dir() else f"no {' or '.join(missing)}"
        fix = f"train it first (mtl train CONFIG output_dir={run})"
        if run.is_dir() and missing == ["results.json"]:
            fix = f"it is still training or was interrupted: let it finish, or resume it (mtl train CONFIG output_dir={run} resume=true)"
        raise ConfigError(f"{where}: {run} is not a finished training run ({what}; relative paths start from {Path.cwd()}); {fix}, or fix the path.")


def build_candidate(cfg: DictConfig, label: str, where: str, cand: dict[str, Any]) -> Candidate:
    import torch

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # a randomly initialised candidate is the same trunk on every run
    if "run" in cand:
        trunk, source, note = _run_trunk(Path(cand["run"]), where)
    else:
        merged = merged_trunk(to_dict(cfg)["trunk"], cand.get("trunk") or {})
        trunk = _trunk(merged, where)
        source, note = _pretrained_head(merged, where)
    return Candidate(label, where, trunk, source, note, time.perf_counter() - start)


def _trunk(node: dict[str, Any], where: str) -> Any:
    from mtl.builders import feature_cache_setting
    from mtl.trunks import build_trunk

    node = dict(node)
    feature_cache_setting(node)  # the framework's own trunk keys: nothing to a forward pass
    try:
        return build_trunk(node, where=where)
    except ConfigError:
        raise
    except ComponentError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _run_trunk(run: Path, where: str) -> tuple[Any, Callable[[Any], Any] | None, str]:
    """A training run's selected model (checkpoints/best.pt): its trunk, and its classification
    heads as the source classifier."""
    import torch

    from mtl.builders import build_tasks, import_plugins
    from mtl.heads import HEADS
    from mtl.registry import build
    from mtl.task import ClassificationTask
    from mtl.trunks.loading import extract_state_dict, load_state, read_checkpoint

    try:
        run_cfg = resolve(OmegaConf.to_container(OmegaConf.load(run / "config.yaml")))
    except (ConfigError, OmegaConfBaseException) as e:
        raise ConfigError(f"{where}: cannot read {run / 'config.yaml'} as a run config ({str(e).splitlines()[0]}).") from None
    node = to_dict(run_cfg)["trunk"]
    node.pop("checkpoint", None)  # best.pt holds the trained trunk; the file it started from is not needed
    trunk = _trunk(node, f"{where} ({run / 'config.yaml'}: trunk)")
    best = str(run / "checkpoints" / "best.pt")
    try:
        state = read_checkpoint(best, where)
        load_state(trunk, extract_state_dict(state, best, where), best, where, type(trunk).__qualname__)
    except ComponentError as e:
        raise ConfigError(str(e)) from None
    import_plugins(run_cfg)
    tasks, head_nodes = build_tasks(run_cfg)
    heads = [(name, task) for name, task in tasks.items() if isinstance(task, ClassificationTask)]
    if not heads:
        return trunk, None, f"the run's tasks ({', '.join(tasks)}) have no classification head"
    weights = state["model"]

    @torch.no_grad()
    def source(features: torch.Tensor) -> torch.Tensor | str:
        probs = None
        for name, task in heads:
            head = build(HEADS, head_nodes[name], f"tasks.{name}.head", tuple(features.shape[1:]), task.num_outputs)
            prefix = f"heads.{name}."
            saved = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            own = head.state_dict()
            if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
                return f"the head of {name} was sized for other features than this target's {tuple(features.shape[1:])}"
            head.load_state_dict(saved)
            p = torch.softmax(head.eval()(features.cpu()).double(), dim=1)
            # Several source heads: the joint source label (z_1, z_2, ...), its probability the product.
            probs = p if probs is None else (probs[:, :, None] * p[:, None, :]).flatten(1)
        return probs

    classes = " x ".join(f"{task.num_outputs} ({name})" for name, task in heads)
    return trunk, source, f"head of {classes} source classes"


def _pretrained_head(node: dict[str, Any], where: str) -> tuple[Callable[[Any], Any] | None, str]:
    """A pretrained classifier's own head on the trunk's pooled features, where the weights come
    with one: EfficientNet-Lite0's ImageNet-1k classifier."""
    import torch

    if node.get("name") == "efficientnet_lite0" and node.get("weights") == "imagenet":
        from mtl.trunks.efficientnet_lite import imagenet_classifier

        try:
            classifier = imagenet_classifier().classifier.eval()
        except ComponentError as e:
            raise ConfigError(f"{where}: {e}") from None

        @torch.no_grad()
        def source(features: torch.Tensor) -> torch.Tensor | str:
            return torch.softmax(classifier(features.cpu()).double(), dim=1)

        return source, "ImageNet-1k classifier (1000 source classes)"
    if node.get("checkpoint"):
        return None, "a trunk file holds none (rank the run that saved it instead: {run: DIR})"
    return None, "none with a randomly initialised or headless trunk"


def check_fit(candidate: Candidate, targets: list[Target]) -> None:
    """A dry run of the candidate's trunk on one input of each target: a trunk that cannot take
    a target's inputs is reported before anything is scored."""
    from mtl.trunks.base import TrunkInputError

    for target in targets:
        shape = tuple(target.inputs.shape[1:])
        try:
            candidate.trunk.feature_shape(shape)
        except (TrunkInputError, RuntimeError) as e:
            hint = getattr(candidate.trunk, "input_hint", None)
            fix = ("rank a run whose trunk takes these inputs" if candidate.where.endswith((".run", ".comparison"))
                   else "give this candidate a trunk for these inputs (its in_features or in_channels, say)")
            raise ConfigError(
                f"{candidate.where}: trunk {type(candidate.trunk).__name__} cannot take the inputs of target tasks.{target.name} "
                f"(shape {shape}){'; it expects ' + hint if hint else ''}. {fix[0].upper() + fix[1:]}, or remove it from rank.candidates. "
                f"Torch said: {str(e).splitlines()[0]}"
            ) from None


# ---- scoring --------------------------------------------------------------------------------


def features(trunk: Any, inputs: Any, batch_size: int, device: Any) -> Any:
    """The trunk's raw features of ``inputs`` (eval mode, no grad), on the CPU."""
    import torch

    trunk.eval().to(device)
    with torch.no_grad():
        return torch.cat([trunk(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)])


def prepare(cfg: DictConfig, node: dict[str, Any]) -> tuple[Settings, list[Target], list[Candidate]]:
    """Everything `mtl rank` checks before it scores (what `mtl validate --for rank` runs): the
    rank node, every path, the targets' data, each candidate built and dry-run on each target."""
    s = settings(cfg, node)
    plan = expand(s.candidates, to_dict(cfg)["trunk"])
    targets = load_targets(cfg, s)
    candidates = []
    for label, where, cand in plan:
        candidate = build_candidate(cfg, label, where, cand)
        check_fit(candidate, targets)
        candidates.append(candidate)
    return s, targets, candidates


def rank(cfg: DictConfig, node: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check everything, score every candidate for every target, write rank.csv and rank.md."""
    import pandas as pd

    from mtl.builders import resolve_device
    from mtl.heads import Head
    from mtl.results import write_text

    device = resolve_device(cfg.device)
    s, targets, candidates = prepare(cfg, node)
    rows = []
    for target in targets:
        for c in candidates:
            start = time.perf_counter()
            raw = features(c.trunk, target.inputs, s.batch_size, device)
            pooled = Head.to_vector(raw).double().numpy()
            probs, source_note = None, c.source_note
            if c.source is not None and target.kind == CLASSIFICATION:
                out = c.source(raw)
                probs, source_note = (None, out) if isinstance(out, str) else (out.numpy(), c.source_note)
            features_s = time.perf_counter() - start
            for name, score in s.scores.items():
                note = target.note if target.kind is None else score.not_applicable(target.kind, probs is not None)
                if note and score.needs_source and probs is None and target.kind == CLASSIFICATION:
                    note = f"needs a source classifier: {source_note}"
                value, start = math.nan, time.perf_counter()
                if note is None:
                    try:
                        value = score.score(pooled, target.labels, probs)
                    except np.linalg.LinAlgError as e:
                        note = f"failed: {e}"
                    if note is None and not math.isfinite(value):
                        note = "not finite (degenerate features?)"
                rows.append({
                    "target": target.name, "candidate": c.label, "score": name, "value": value, "not_applicable": note or "",
                    "samples": len(target.labels), "feature_dim": pooled.shape[1], "load_s": round(c.load_s, 4),
                    "features_s": round(features_s, 4), "score_s": round(time.perf_counter() - start, 4),
                })
            log(f"{target.name} <- {c.label}: {len(target.labels)} samples, {pooled.shape[1]} features, "
                f"{features_s:.2f}s forward, {sum(r['score_s'] for r in rows[-len(s.scores):]):.2f}s scores")
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby(["target", "score"])["value"].rank(ascending=False, method="min")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = tables(df, list(s.scores))
    result = {"table": df, "csv": out / "rank.csv", "md": out / "rank.md"}
    if s.validation is not None:
        checked = s.validation.table(df, cfg.seed)
        markdown += "\n" + validation_markdown(checked, s.validation) + "\n"
        write_text(checked.to_csv(index=False), out / "rank_validation.csv")
        result.update(validation=checked, validation_csv=out / "rank_validation.csv")
    write_text(df.to_csv(index=False), out / "rank.csv")
    write_text(markdown, out / "rank.md")
    return {**result, "markdown": markdown}


def tables(df: Any, scores: list[str]) -> str:
    """One markdown table per target: each score's value and its rank among the candidates (1 =
    best), n/a with the reason below, and the seconds each candidate took."""
    parts = []
    for target, rows in df.groupby("target", sort=False):
        head = ["candidate", *scores, "load s", "forward s", "scores s"]
        lines = [f"### Target: {target} ({rows['samples'].iloc[0]} training samples)", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        reasons: dict[str, list[str]] = {}
        for candidate, cand_rows in rows.groupby("candidate", sort=False):
            cells = []
            for name in scores:
                r = cand_rows[cand_rows["score"] == name].iloc[0]
                if r["not_applicable"]:
                    cells.append("n/a")
                    reasons.setdefault(r["not_applicable"], []).append(f"{name} for {candidate}")
                else:
                    cells.append(f"{r['value']:.4g} ({int(r['rank'])})")
            first = cand_rows.iloc[0]
            times = [f"{first['load_s']:.2f}", f"{first['features_s']:.2f}", f"{cand_rows['score_s'].sum():.2f}"]
            lines.append("| " + " | ".join([str(candidate), *cells, *times]) + " |")
        lines.append("")
        lines += [f"n/a: {', '.join(where)}: {why}." for why, where in reasons.items()]
        wide = rows[rows["feature_dim"] >= rows["samples"] - 1]["candidate"].unique()
        if "hscore" in scores and len(wide):
            # The centred features then span the centred sample space: tr(UᵀPU) = C - 1 for any features.
            lines.append(f"hscore for {', '.join(map(str, wide))}: at least as many features as samples - 1, where H-score is "
                         "the number of classes - 1 whatever the features; raise rank.max_samples to tell them apart.")
        parts.append("\n".join(lines).rstrip())
    legend = "Higher is better for every score; (k) is the candidate's rank among this target's candidates."
    return "\n\n".join([*parts, legend]) + "\n"
