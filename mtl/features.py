"""A frozen trunk's features, computed once per input and reused (issue 20: a probe costs a
head's training, not the trunk's forward at every step).

``FeatureCache.attach(trunk)`` takes over the trunk instance's ``forward`` (as the hooks of
Hugging Face ``accelerate`` do) instead of wrapping the trunk in another module: the model's
``trunk`` attribute, its type, state-dict keys, layer groups and parameters stay exactly as
they were, so checkpoints, ``trunk.pt``, recipes, the gradient engine and the training step
see the same trunk, and nothing in the data path changes. It is keyed by input content, not
by dataset index, because the trunk sees batches only: no index reaches it, and content
keys also serve evaluation, shared inputs and every split alike.

The cache is active only while the trunk is frozen: no trunk parameter requires a gradient
and every trunk module is in eval mode (BatchNorm statistics and dropout fixed); otherwise
the trunk runs as if no cache were there. A feature is looked up by

    (trunk fingerprint, input dtype, per-sample shape, device, autocast dtype, digest of the sample's bytes)

where the fingerprint hashes the trunk's class, its plain settings (image size, tokenizer
length, pooling, ...) and the bytes of every parameter and buffer (the preprocessing's own
constants included). Tensor version counters tell when the weights may have changed (an
optimizer step, ``load_state_dict``, a move to another device), and the fingerprint is then
recomputed, so fine-tuned weights never meet features of the weights before them (a write
through ``.data`` escapes the counters: change weights by ``load_state_dict`` or in place). A batch
runs the trunk on its misses only, in one forward. Tables live in one process-wide store,
least recently used first, so the cells of a comparison that freeze the same pretrained
trunk share the features of their common validation and test sets. When one trunk's
features exceed ``max_mb`` (random augmentation: inputs never repeat), its cache switches
itself off, with a log line, instead of growing without bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MAX_MB = 1024


def fingerprint(trunk: nn.Module) -> str:
    """A digest of what a trunk computes: its class, plain settings, and every parameter's and
    buffer's name, dtype, shape and bytes (non-persistent buffers too: preprocessing constants)."""
    h = hashlib.blake2b(digest_size=16)
    kind = type(trunk)
    settings = {
        k: v for k, v in vars(trunk).items() if k != "training" and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))
    }
    h.update(json.dumps([f"{kind.__module__}.{kind.__qualname__}", settings], sort_keys=True).encode())
    for name, t in [*trunk.named_parameters(), *trunk.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Store:
    """Feature tables of every cached trunk in this process, by fingerprint, least recently used first."""

    def __init__(self) -> None:
        self.tables: OrderedDict[str, dict[bytes, torch.Tensor]] = OrderedDict()
        self.sizes: dict[str, int] = {}

    def table(self, key: str) -> dict[bytes, torch.Tensor]:
        self.tables.setdefault(key, {})
        self.sizes.setdefault(key, 0)
        self.tables.move_to_end(key)
        return self.tables[key]

    def add(self, key: str, nbytes: int, budget: int) -> bool:
        """Count ``nbytes`` more for table ``key``, evicting other tables while the total exceeds
        ``budget``; False when ``key``'s table alone exceeds it (then it is dropped)."""
        self.sizes[key] += nbytes
        while sum(self.sizes.values()) > budget and len(self.tables) > 1:
            oldest = next(k for k in self.tables if k != key)
            self.drop(oldest)
        if self.sizes[key] > budget:
            self.drop(key)
            return False
        return True

    def drop(self, key: str) -> None:
        self.tables.pop(key, None)
        self.sizes.pop(key, None)

    def clear(self) -> None:
        self.tables.clear()
        self.sizes.clear()


STORE = _Store()


class FeatureCache:
    """Serves a frozen trunk's features from memory, running the trunk on new inputs only.

    ``attach(trunk, max_mb)`` installs it; ``detach(trunk)`` removes it. ``hits`` and
    ``misses`` count samples; ``enabled`` turns False, for good, once the trunk's features
    pass ``max_mb`` megabytes (the log says so)."""

    def __init__(self, trunk: nn.Module, max_mb: float = DEFAULT_MAX_MB):
        self.trunk = trunk
        self.budget = int(max_mb * 2**20)
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._version: tuple | None = None
        self._key = ""

    @classmethod
    def attach(cls, trunk: nn.Module, max_mb: float = DEFAULT_MAX_MB) -> FeatureCache:
        cache = cls(trunk, max_mb)
        # An instance attribute: nn.Module.__call__ looks up self.forward, so this runs instead
        # of the class's forward, and neither the state dict nor the submodules change.
        trunk.forward = cache
        return cache

    @staticmethod
    def detach(trunk: nn.Module) -> None:
        if isinstance(trunk.__dict__.get("forward"), FeatureCache):
            del trunk.forward

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        # The class's forward, looked up on the class: the instance's is this cache.
        return type(self.trunk).forward(self.trunk, *args, **kwargs)

    def _frozen_state(self) -> tuple | None:
        """The version of every weight and buffer while the trunk is frozen; None when it is not."""
        state = []
        for p in self.trunk.parameters():
            if p.requires_grad:
                return None
            state.append((p.data_ptr(), p._version))
        if any(m.training for m in self.trunk.modules()):
            return None
        state += [(b.data_ptr(), b._version) for b in self.trunk.buffers()]
        return tuple(state)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not self.enabled or not isinstance(x, torch.Tensor) or x.requires_grad or x.dim() == 0 or len(x) == 0:
            return self._run(x, *args, **kwargs)
        state = self._frozen_state()
        if state is None:
            self._version = None
            return self._run(x)
        if state != self._version:
            self._key, self._version = fingerprint(self.trunk), state
        table = STORE.table(self._key)
        digests = self._digests(x)
        missing = {d: i for i, d in enumerate(digests) if d not in table}  # first row of each new input
        new = sum(d in missing for d in digests)
        self.hits += len(digests) - new
        self.misses += new
        if missing:
            with torch.no_grad():
                features = self._run(x[list(missing.values())])
            table.update(zip(missing, features.unbind(0)))
            if not STORE.add(self._key, features.numel() * features.element_size(), self.budget):
                self.enabled = False
                logger.warning(
                    "trunk.feature_cache: off for this run: the frozen trunk's features passed %.0f MB, its inputs "
                    "rarely repeat (random augmentation never repeats one); raise trunk.feature_cache_mb, or set "
                    "trunk.feature_cache=false to skip the lookups.", self.budget / 2**20,
                )
            if len(missing) == len(digests):
                return features
            if not self.enabled:
                return self._run(x)
        return torch.stack([table[d] for d in digests])

    def _digests(self, x: torch.Tensor) -> list[bytes]:
        """One digest per sample: its bytes (in contiguous layout, so channels_last inputs
        match) after a prefix naming dtype, shape, device and autocast."""
        device = x.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        prefix = hashlib.blake2b(f"{x.dtype}:{tuple(x.shape[1:])}:{x.device}:{autocast}".encode(), digest_size=16)
        rows = x.detach().cpu().contiguous().reshape(len(x), -1).view(torch.uint8).numpy()
        out = []
        for row in rows:
            h = prefix.copy()
            h.update(row)
            out.append(h.digest())
        return out


def clear() -> None:
    """Forget every cached feature of this process."""
    STORE.clear()
