"""The gradient engine: per-task gradients for gradient-level weightings, and the update.

For a ``GradientWeighting`` the engine forms ``J`` ``[T, D]``, the gradients of the task
objectives (``weighting.transform_losses``) w.r.t. what the method's ``mode`` names:

- ``parameters``: the trainable shared parameters (``model.shared_parameters()``: the trunk
  under hard sharing);
- ``last_shared``: the last shared layer's parameters (GradNorm's W);
- ``representation``: the shared representation the architecture marks (``model.cut``: the
  trunk's output under hard sharing), when one input batch feeds every task
  (MGDA-UB's upper bound; Sener & Koltun 2018); the trunk then back-propagates once.

J is computed with one batched backward (``is_grads_batched``) where autograd can vmap
the graph, else one backward per task. The method's ``Aggregation`` becomes the update:
task weights alone → one backward of Σ_t w_t o_t (exact for every parameter); a combined
gradient → written into the shared parameters, while the heads get the gradient of their
own objectives. Weights can be recomputed every ``every`` steps and reused in between.

A ``GramianWeighting`` in a parameter mode gets only G = JJᵀ, computed stage by stage
without J where the trunk's graph has cuts (``mtl.gramian``; ``staged=False`` forms J);
its weights w then update the shared parameters by one backward of Σ_t w_t o_t.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl.architectures import Architecture
from mtl.distributed import Context
from mtl.gramian import plan, recording, staged_gramian, vjp_rows, write_rows
from mtl.weighting import Aggregation, GradientWeighting, GramianWeighting


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient in a training step."""


def jacobian(objectives: torch.Tensor, inputs: list[torch.Tensor], chunk: int = 0) -> torch.Tensor:
    """``[T, D]``: row t is the gradient of ``objectives[t]`` w.r.t. ``inputs``, flattened.

    One vectorized backward per ``chunk`` tasks (0: all T at once): its transient memory
    (the batched activation gradients) grows with the chunk, not with T; the rows are
    written into one preallocated J.
    """
    T = len(objectives)
    J = torch.empty(T, sum(x.numel() for x in inputs), dtype=inputs[0].dtype, device=objectives.device)
    eye = torch.eye(T, dtype=objectives.dtype, device=objectives.device)
    for start, stop, grads in vjp_rows(objectives, eye, inputs, chunk):
        write_rows(J[start:stop], grads, inputs)
    return J


class GradientEngine:
    def __init__(
        self,
        model: Architecture,
        weighting: GradientWeighting,
        every: int = 1,
        chunk: int = 0,
        ctx: Context | None = None,
        record_every: int = 1,
        staged: bool = True,
    ):
        self.model = model
        self.weighting = weighting
        self.every = every
        self.chunk = chunk
        # Graph cuts are recorded on the one trunk every task reads; other architectures form J.
        self.staged = staged and isinstance(weighting, GramianWeighting) and weighting.mode != "representation" and model.trunk is not None
        self.ctx = ctx or Context()
        self.record_every = record_every  # the trainer's log_every: diagnostics only where they are logged
        self._weights: torch.Tensor | None = None
        self.diagnostics: dict[str, torch.Tensor] = {}  # last J's weights, norms, cosines

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The last computed task weights: with ``every > 1`` the steps until the next
        recomputation reuse them, so a resumed run must too."""
        return {"weights": self._weights}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        weights = state["weights"]
        self._weights = None if weights is None else weights.to(next(self.model.parameters()).device)

    def _shared(self) -> list[nn.Parameter]:
        """What the architecture shares (``mtl.architectures``), or its last shared layer."""
        model = self.model
        params = model.last_shared_parameters() if self.weighting.mode == "last_shared" else model.shared_parameters()
        return [p for p in params if p.requires_grad]

    def backward(
        self,
        inputs: dict[str, torch.Tensor],
        members: dict[str, list[str]],
        targets: dict[str, torch.Tensor],
        loss_fn,
        step: int,
        penalty_fn,
    ) -> dict[str, torch.Tensor]:
        """Forward, per-task gradients, aggregation and the backward; returns the task losses.

        ``loss_fn(outputs, targets)`` returns each task's loss (``mtl.losses.task_losses``).
        Nash-MTL's cap of the update norm is the trainer's (``GradientClip``): it needs the
        gradient averaged over ranks, which the trainer computes once."""
        return self._update(inputs, members, targets, loss_fn, step, penalty_fn)

    def _update(self, inputs, members, targets, loss_fn, step, penalty_fn) -> dict[str, torch.Tensor]:
        w = self.weighting
        reuse = self._weights is not None and step % self.every != 0
        representation = w.mode == "representation"
        cuts: list[torch.Tensor] = []
        features = leaf = None
        if representation:
            # The architecture marks its shared representation (model.cut); one input batch
            # feeds every task here (checked before training), so there is one cut.
            with self.model.representation_cuts() as marked:
                outputs = self.model.forward_groups(inputs, members)
            ((features, leaf),) = marked
        elif self.staged and not reuse:
            with recording(self.model.trunk) as cuts:
                outputs = self.model.forward_groups(inputs, members)
        else:
            outputs = self.model.forward_groups(inputs, members)
        losses = loss_fn(outputs, targets)
        L = torch.stack([losses[t] for t in w.tasks])
        w.observe(L.detach())
        objectives = w.transform_losses(L)
        penalty = penalty_fn()
        if penalty is not None:
            # The penalty's gradient first, into every parameter it reaches (the recipe's, the
            # architecture's own), keeping the graph it may share with the objectives (gates).
            penalty.backward(retain_graph=True)
        shared = [leaf] if representation else self._shared()
        if not shared:
            # Frozen trunk (a probe): heads have their own losses, no weighting to compute.
            self._backward(objectives.sum(), None, None)
            return losses
        if reuse:
            self._apply(self._weights, objectives, shared, features, leaf)
            return losses
        stages = plan(objectives, cuts, shared) if cuts else None
        if stages is not None:
            J = None
            gram = staged_gramian(objectives, stages, self.chunk, (lambda block: self.ctx.mean_([block])) if self.ctx.active else None)
            check = gram.diagonal()
        else:
            J = self._global(jacobian(objectives, shared, self.chunk))
            gram = None
            check = J.sum(dim=1)
        # One host sync: a solver fed NaNs fails obscurely or carries them in its state. A
        # NaN or inf anywhere in a row of J makes its sum, and its squared norm, non-finite.
        finite = torch.isfinite(check)
        if not bool(finite.all()):
            bad = [t for t, ok in zip(w.tasks, finite.tolist()) if not ok]
            values = ", ".join(f"task {t!r} loss {losses[t].item()}" for t in bad)
            raise NonFiniteError(f"non-finite gradient of {values}")
        result = Aggregation(weights=w.weigh(gram).to(objectives.dtype)) if gram is not None else w.aggregate(J)
        # With weights reused between recomputations, the logged step may find none: keep each.
        if (step + 1) % self.record_every == 0 or self.every > 1:
            self._record(gram if gram is not None else J @ J.T, result.weights)
        if result.weights is not None:
            self._weights = result.weights.detach()
        if result.gradient is None:
            self._apply(self._weights, objectives, shared, features, leaf)
            return losses
        if representation:
            heads = self._task_specific()
            torch.autograd.backward(objectives.sum(), inputs=heads)
            if features.requires_grad:
                gradient = result.gradient
                if self.ctx.active:
                    # This rank's samples' block of the global-batch gradient, scaled so that the
                    # trainer's mean over ranks sums the blocks.
                    gradient = gradient.view(self.ctx.world, -1)[self.ctx.rank] * self.ctx.world
                features.backward(gradient.view_as(features).to(features.dtype))
            return losses
        others = self._others(shared)
        if others:
            torch.autograd.backward(objectives.sum(), inputs=others)
        offset = 0
        for p in shared:
            g = result.gradient[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = g if p.grad is None else p.grad + g  # on top of the penalty's
        return losses

    def _global(self, J: torch.Tensor) -> torch.Tensor:
        """Under torchrun, the Jacobian of the global batch, the same on every rank.

        Parameters: the mean of the ranks' J (each holds the gradients of its shard's mean
        loss). Representation: each rank's columns are its own samples' features, so the
        global J is the ranks' J side by side (in rank order, as the samples of the global
        batch), divided by the number of ranks (a shard's mean loss weighs each sample N
        times more than the global mean does)."""
        if not self.ctx.active:
            return J
        if self.weighting.mode != "representation":
            self.ctx.mean_([J])
            return J
        parts = [torch.empty_like(J) for _ in range(self.ctx.world)]
        torch.distributed.all_gather(parts, J.contiguous())
        return torch.cat(parts, dim=1) / self.ctx.world

    def _task_specific(self) -> list[nn.Parameter]:
        """The trainable parameters the architecture does not share: heads, gates, towers."""
        return self._others(self.model.shared_parameters())

    def _others(self, shared: list[nn.Parameter]) -> list[nn.Parameter]:
        """The trainable parameters outside ``shared``: the heads (and any frozen-trunk remainder)."""
        shared_ids = {id(p) for p in shared}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in shared_ids]

    def _backward(self, total, features, leaf) -> None:
        total.backward()
        if features is not None and features.requires_grad:
            features.backward(leaf.grad)

    def _apply(self, weights, objectives, shared, features, leaf) -> None:
        """The update of task weights: Σ_t w_t o_t back-propagated. A method whose weights make
        a modified shared gradient or can be negative (PCGrad, GradVac, CAGrad, IMTL-G,
        Aligned-MTL: ``weigh_heads`` False) gets it on the shared parameters (or the
        representation) only, and each head the gradient of its own objective."""
        total = (weights.to(objectives.dtype) * objectives).sum()
        if not (isinstance(self.weighting, GramianWeighting) and not self.weighting.weigh_heads):
            self._backward(total, features, leaf)
            return
        if features is not None:
            # One (vectorized) backward through the heads for both: row 0 gives the representation
            # Σ_t w_t ∇o_t, row 1 each head its own objective's gradient (a head's parameters
            # reach only its own objective).
            heads = self._task_specific()
            rows = torch.stack([weights.to(objectives.dtype), torch.ones_like(objectives)])
            found: list[list[torch.Tensor | None]] = [[], []]
            for start, stop, grads in vjp_rows(objectives, rows, [leaf, *heads]):
                for r in range(start, stop):
                    found[r] = [None if g is None else g[r - start] for g in grads]
            (gradient, *_), (_, *own) = found
            for p, g in zip(heads, own):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            if features.requires_grad:
                features.backward(gradient)
            return
        heads_total = objectives.sum()
        others = self._others(shared)
        torch.autograd.backward(total, inputs=shared, retain_graph=bool(others))
        if others:
            torch.autograd.backward(heads_total, inputs=others)

    def _record(self, gram: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Norms and pairwise cosines from the Gramian (a [T, T] matrix, no copy of J)."""
        gram = gram.float()
        norms = gram.diagonal().clamp(min=0).sqrt()
        safe = norms.clamp(min=1e-12)
        self.diagnostics = {"norms": norms.detach(), "cosines": (gram / safe[:, None] / safe[None, :]).detach()}
        if weights is not None:
            self.diagnostics["weights"] = weights.detach().float()
