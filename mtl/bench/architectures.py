"""Time one forward and backward of each architecture, and count its parameters, against hard
sharing on the same trunk, at each number of tasks T:

    python -m mtl.bench.architectures --trunk seed_net --tasks 2 10
    # = --batch 64 --repeats 5 --threads 0 (torch's default)

Every task has a 10-class linear head on one shared input batch; the loss is the sum of the
T cross-entropies and one ``backward``. Cross-stitch and LTB rows run their trunk copies in one
vmap call per stage (``architecture.batched=true``), the ``loop`` rows in a Python loop
(``batched=false``). After one untimed step, ms is the
median of ``--repeats`` timed steps (``time.perf_counter``, synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mtl.architectures.branching  # noqa: F401  (registers cross_stitch and ltb)
import mtl.architectures.mtan  # noqa: F401  (registers mtan)
from mtl.architectures import ARCHITECTURES
from mtl.heads import LinearHead
from mtl.trunks import build_trunk

ROWS = ["hard", "cross_stitch", "cross_stitch loop", "ltb", "ltb loop", "mtan"]
INPUTS = {"seed_net": (1, 28, 28), "multi_lenet": (1, 28, 28), "resnet18": (3, 32, 32)}


def build(row: str, trunk: str, input_shape: tuple, tasks: int, device: torch.device):
    torch.manual_seed(0)
    node = {"name": trunk}
    first = build_trunk(node)
    shape = first.feature_shape(input_shape)
    heads = {f"t{i}": LinearHead(shape, 10) for i in range(tasks)}
    arguments = {"batched": not row.endswith("loop")} if row.startswith(("cross_stitch", "ltb")) else {}
    model = ARCHITECTURES.get(row.split()[0])(first, heads, lambda: build_trunk(node), **arguments)
    return model.to(device).train()


def step_ms(model, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    def step() -> float:
        start = time.perf_counter()
        out = model(x)
        sum(F.cross_entropy(o, y) for o in out.values()).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1000

    step()
    return statistics.median(step() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunk", default="seed_net", choices=sorted(INPUTS))
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = INPUTS[args.trunk]
    print(f"{args.trunk}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'T':>3}  {'architecture':<18} {'params':>10} {'x hard':>7} {'ms':>9} {'x hard':>7}")
    for tasks in args.tasks:
        x = torch.randn(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        base_params = base_ms = None
        for row in ROWS:
            model = build(row, args.trunk, shape, tasks, device)
            params = sum(p.numel() for p in model.parameters())
            ms = step_ms(model, x, y, args.repeats)
            base_params, base_ms = base_params or params, base_ms or ms
            print(f"{tasks:>3}  {row:<18} {params:>10,} {params / base_params:>7.2f} {ms:>9.1f} {ms / base_ms:>7.2f}")


if __name__ == "__main__":
    main()
