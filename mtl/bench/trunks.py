"""Step time of a trunk on a real batch of a registered task: fine-tuning, probing through the
frozen trunk, and probing from the feature cache (``mtl.features``), in one run.

    python -m mtl.bench.trunks                  # the pretrained trunks at their default sizes, batch 32
    python -m mtl.bench.trunks --case '{trunk: {name: minilm, max_length: 64}, task: bbc_news}'
    python -m mtl.bench.trunks --case '{trunk: {name: seed_net}, task: {name: digits, size: 28}}' --batch 4
    python -m mtl.bench.trunks --device cuda --rounds 5      # bash mtl/bench/device_check.sh runs this

Each ``--case`` is a YAML node ``{trunk: <trunk node>, task: <task name or node>}``; the
default cases are EfficientNet-Lite0 with its ImageNet weights at its default 224 px on sklearn
digits (28×28, upsampled by the trunk) and all-MiniLM-L6-v2 at its default 256 tokens on BBC
News articles. Per case: the trunk is built from its node, one linear head of the task's
outputs is sized from the trunk's features, and the batch is the first ``--batch`` examples of
the task's training split, as the trainer reads them (images, or a text task's UTF-8 rows).
One step is forward, cross-entropy, backward and an AdamW step; each row's median over
``--rounds`` timed steps follows one untimed step:

- ``fine_tune``: train mode, every parameter trains;
- ``probe``: the trunk frozen (``mtl.recipes.freeze``: no gradients, eval mode), run on the
  batch at every step, the head trains;
- ``cached``: as ``probe``, with the feature cache attached: the untimed step fills it, the
  timed steps read the batch's features from it.

Reported per row: ms per step and its ratio to ``fine_tune``; ``probe / cached`` is the
cache's speed-up on a probe step. Ratios within one run carry to another machine's load;
absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from mtl.builders import load_datasets
from mtl.features import FeatureCache
from mtl.recipes import freeze
from mtl.registry import build
from mtl.task import TASKS
from mtl.trunks import build_trunk

DEFAULT_CASES = [
    "{trunk: {name: efficientnet_lite0, weights: imagenet}, task: {name: digits, size: 28}}",
    "{trunk: {name: minilm}, task: bbc_news}",
]
ROWS = ("fine_tune", "probe", "cached")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtl.bench.trunks", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", dest="cases", help="{trunk: ..., task: ...} as YAML; repeat for more (default: the pretrained trunks)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per row, after one untimed step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.cases = args.cases or DEFAULT_CASES
    return args


def _case(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    node = yaml.safe_load(text)
    if not isinstance(node, dict) or not {"trunk", "task"} <= set(node):
        raise SystemExit(f"--case {text!r}: give a YAML node with trunk and task, e.g. '{{trunk: {{name: seed_net}}, task: digits}}'")
    trunk, task = node["trunk"], node["task"]
    return (trunk if isinstance(trunk, dict) else {"name": trunk}), (task if isinstance(task, dict) else {"name": task})


def _batch(task_node: dict[str, Any], size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    task = build(TASKS, dict(task_node), "task")
    train = load_datasets({"task": task})["task"].train
    items = [train[i] for i in range(min(size, len(train)))]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items]), task.num_outputs


def _median_step(step, rounds: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(rounds))


def bench_case(trunk_node: dict[str, Any], task_node: dict[str, Any], batch: int, rounds: int,
               device: torch.device = torch.device("cpu")) -> list[dict[str, Any]]:
    x, y, outputs = _batch(task_node, batch)
    torch.manual_seed(0)
    trunk = build_trunk(dict(trunk_node)).to(device)
    head = torch.nn.Linear(trunk.feature_shape(tuple(x.shape[1:]))[0], outputs).to(device)
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.AdamW([*trunk.parameters(), *head.parameters()], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(trunk(x)), y).backward()
        optimizer.step()

    seconds = {"fine_tune": _median_step(step, rounds, device)}
    freeze(trunk)
    seconds["probe"] = _median_step(step, rounds, device)
    cache = FeatureCache.attach(trunk)
    seconds["cached"] = _median_step(step, rounds, device)
    FeatureCache.detach(trunk)
    if cache.hits < rounds * len(x):  # every timed step must have been served by it (an earlier case may have filled it)
        raise RuntimeError(f"the feature cache served {cache.hits} of {rounds * len(x)} samples; the cached row timed the trunk")
    label = f"{yaml.safe_dump(trunk_node, default_flow_style=True).strip()} on {task_node['name']}"
    return [{"case": label, "row": row, "batch": len(x), "ms": round(1000 * s, 3), "vs_fine_tune": round(s / seconds["fine_tune"], 4),
             "probe_vs_cached": round(seconds["probe"] / seconds["cached"], 1) if row == "cached" else None}
            for row, s in seconds.items()]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.rounds} steps")
    print(f"{'row':<11}{'ms/step':>12}{'x fine_tune':>13}{'probe/cached':>14}")
    for text in args.cases:
        trunk, task = _case(text)
        case = bench_case(trunk, task, args.batch, args.rounds, torch.device(args.device))
        print(case[0]["case"])
        for r in case:
            speedup = f"{r['probe_vs_cached']:.1f}" if r["probe_vs_cached"] is not None else ""
            print(f"{r['row']:<11}{r['ms']:>12.2f}{r['vs_fine_tune']:>13.4f}{speedup:>14}", flush=True)
        rows += case
    if args.out:  # with the settings, so a number read back later says what it measured
        settings = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
                    "rounds": args.rounds}
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
