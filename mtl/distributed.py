"""Data-parallel training under ``torchrun``: every rank takes the same step.

``torchrun --nproc_per_node=N -m mtl train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``setup`` joins them (NCCL on CUDA, gloo on CPU).
Every rank draws the same global batch (same seeds) and trains on its contiguous shard
of ``batch_size / N`` rows, so the samples of a step do not depend on N.

Gradients are averaged with one all-reduce of a flat buffer, instead of wrapping the model
in ``DistributedDataParallel``: DDP's reducer hooks only ``.backward()`` into ``.grad``,
while gradient-level weightings need the per-task Jacobian of the *global* batch. Here the
engine all-reduces J before the method sees it, and all ranks aggregate the same J.

Loss values are made global without changing what their gradients average to
(``global_losses``): with s_r = world·n_r/N (n_r labelled samples of the task on rank r,
N on all ranks; s_r = 1 when every sample is labelled), L_eff = s_r L_r + (L_global −
s_r L_r).detach() has the global batch's value and the gradient s_r ∂L_r/∂θ, so any
weighting f(L) (nonlinear ones too: GLS, log, IMTL-L) gets f'(L_global) s_r ∂L_r/∂θ on each
rank, whose average is the global batch's gradient, partial labels included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch."""
        return x.tensor_split(self.world)[self.rank] if self.active else x

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over ranks in place, with one all-reduce of a flat buffer."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def global_losses(self, losses: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss with the global batch's value, and a gradient whose mean over ranks is the global batch's.

        A task's loss is a mean over its labelled samples, ``counts[task]`` of them on this
        rank. Rank r's loss L_r, scaled by world·n_r/N with N = Σ_r n_r, has the gradient
        world·n_r/N·∇L_r, whose mean over ranks, Σ_r n_r ∇L_r / N, is the gradient of the
        global batch's mean even when labels are missing unevenly across the shards; its value
        is Σ_r n_r L_r / N (summed in float32 or wider). One all-reduce of 2T numbers."""
        if not self.active:
            return losses
        names = list(losses)
        local = torch.stack([losses[n] for n in names])
        dtype = torch.promote_types(local.dtype, torch.float32)  # half-precision sums lose counts
        n = torch.stack([counts[k] for k in names]).to(dtype)
        flat = torch.cat([local.detach().to(dtype) * n, n])
        dist.all_reduce(flat)
        total = flat[len(names) :].clamp(min=1)  # 0 only where no rank has a label: then every n_r = 0
        value = (flat[: len(names)] / total).to(local.dtype)
        scaled = local * (self.world * n / total).to(local.dtype)
        adjusted = scaled + (value - scaled).detach()
        return dict(zip(names, adjusted.unbind(0)))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop signal, say)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: str) -> Context:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Context(rank, world, local_rank)


def current() -> Context:
    """The context of an initialized process group (for code outside the trainer: compare's writes)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Context()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
