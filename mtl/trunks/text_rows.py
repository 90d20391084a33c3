"""Text as tensors: UTF-8 bytes in zero-padded ``uint8`` rows, the inputs of text tasks.

A module of its own, registering nothing, so a task can import it before the trunk registry
has loaded its built-in modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_texts(texts: Sequence[str], max_bytes: int | None = None) -> torch.Tensor:
    """``[N, L]`` uint8: each text's UTF-8 bytes, zero-padded to the longest (L <= ``max_bytes``;
    a longer text is cut at a character boundary). NUL characters, the padding, are dropped."""
    rows = []
    for text in texts:
        data = text.replace("\0", "").encode("utf-8")
        if max_bytes is not None and len(data) > max_bytes:
            data = data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")
        rows.append(data)
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.zeros(len(rows), width, dtype=torch.uint8)
    for i, data in enumerate(rows):
        out[i, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else out[i, :0]
    return out


def decode_texts(x: torch.Tensor) -> list[str]:
    """The texts of ``encode_texts`` rows."""
    return [row.tobytes().rstrip(b"\0").decode("utf-8", errors="replace") for row in x.cpu().numpy()]
