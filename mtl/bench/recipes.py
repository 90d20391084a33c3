"""What each transfer recipe trains and stores, and the step time of each, in one run.

    python -m mtl.bench.recipes                                   # seed_net, 28×28 inputs
    python -m mtl.bench.recipes --trunk '{name: efficientnet_lite0, weights: imagenet, image_size: 64}' \\
        --input 3 28 28 --batch 32 --rounds 10 --threads 1
    python -m mtl.bench.recipes --device cuda --out recipes.json

For each recipe (its default arguments, or ``--recipes`` as YAML nodes): the trunk is built
once per recipe from the same seed, with one linear head of ``--classes`` outputs, and the
recipe set up as the trainer sets it up. Reported: the parameters it trains and the model's
total (adapters included), the bytes of ``torch.save(recipe.trainable_state(model))`` (the
trained parameters and a reference to the base trunk) against those of the whole model's
state dict, and the median wall time of one training step (forward, cross-entropy,
backward, AdamW step) on a random batch. The recipes' steps alternate within each round, so
a drift of the machine's load reaches all of them alike; ``--warmup`` rounds are untimed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from mtl.builders import build_recipe
from mtl.config import resolve
from mtl.heads import LinearHead
from mtl.model import MultiTaskModel
from mtl.trunks import build_trunk

DEFAULT_RECIPES = ["fine_tune", "linear_probe", "bitfit", "ia3", "lora", "residual_adapters"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtl.bench.recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--trunk", default="{name: seed_net}", help="the trunk node, as YAML (default: %(default)s)")
    p.add_argument("--input", type=int, nargs="+", default=[1, 28, 28], help="one input's shape (default: 1 28 28)")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipe names or YAML nodes, e.g. '{name: lora, rank: 4}'")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each times one step of every recipe")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write the rows as JSON here")
    return p.parse_args(argv)


def _nbytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _node(text: str) -> dict[str, Any]:
    node = yaml.safe_load(text)
    return node if isinstance(node, dict) else {"name": node}


class Case:
    """One recipe on its own copy of the trunk, set up and ready to step."""

    def __init__(self, node: dict[str, Any], args: argparse.Namespace):
        torch.manual_seed(0)
        trunk = build_trunk(_node(args.trunk))
        features = trunk.feature_shape(tuple(args.input))
        self.model = MultiTaskModel(trunk, {"task": LinearHead(features, args.classes)}).to(args.device)
        cfg = resolve({"output_dir": "unused", "tasks": {"mnist": {}}, "trunk": {"name": "seed_net"}, "recipe": node})
        self.recipe = build_recipe(cfg)
        self.recipe.setup(self.model)
        self.model.train()
        self.recipe.start_epoch(self.model, 0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.label = json.dumps(node) if len(node) > 1 else node["name"]
        self.row = {
            "recipe": self.label,
            "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in self.model.parameters()),
            "checkpoint_bytes": _nbytes(self.recipe.trainable_state(self.model)),
            "model_bytes": _nbytes(self.model.state_dict()),
        }
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(x)["task"], y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [Case(_node(text), args) for text in args.recipes]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *args.input, generator=generator).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)
    for round_ in range(args.warmup + args.rounds):
        for case in cases:
            elapsed = case.step(x, y, device)
            if round_ >= args.warmup:
                case.times.append(elapsed)
    full = next((c for c in cases if c.label == "fine_tune"), None)
    rows = []
    for case in cases:
        step_ms = 1000 * statistics.median(case.times) if case.times else float("nan")
        rows.append({**case.row, "step_ms": round(step_ms, 2)})
    if full is not None:
        for row in rows:
            row["step_vs_fine_tune"] = round(row["step_ms"] / rows[cases.index(full)]["step_ms"], 3)
    print(f"trunk {args.trunk}, input {tuple(args.input)}, batch {args.batch}, {args.rounds} rounds on {device}")
    print(f"{'recipe':<28}{'trainable':>12}{'total':>12}{'checkpoint B':>14}{'model B':>12}{'step ms':>10}{'vs FT':>8}")
    for r in rows:
        print(f"{r['recipe']:<28}{r['trainable']:>12,}{r['total']:>12,}{r['checkpoint_bytes']:>14,}{r['model_bytes']:>12,}"
              f"{r['step_ms']:>10.2f}{r.get('step_vs_fine_tune', float('nan')):>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
