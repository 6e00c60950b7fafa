"""The coordinator's token embeddings for decode-sized units, as wire bytes kept per token.

A token's embedding row depends on that token alone, so its bytes are computed once and
kept (first in, first out, under a byte budget). Sending a decode or verify unit then takes
no MLX evaluation on the coordinator's way out: each one is a hand-off to MLX's stream thread
and back, which costs more at every hop than the lookup (about 60-90 us cold on a CPU).
Large units (prefill chunks) are embedded by MLX as before and not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import mlx.core as mx

from ..wire.activations import split_activation
from ..wire.types import Activation

KEEP_ROWS_UP_TO = 64      # units with more rows than this are embedded without the cache


class EmbeddingRows:
    """Embedding rows of `head` by token id, as the bytes a unit frame carries."""

    def __init__(self, head, budget_bytes: int = 32 << 20):
        self.head, self.budget = head, budget_bytes
        self.rows: OrderedDict[int, bytes] = OrderedDict()
        self.nbytes = 0
        self.dtype, self.width = "", 0
        self.hits = self.misses = 0

    def activation(self, tokens: Sequence[int]) -> Activation:
        """The rows of `tokens` [T, H] (T > 0), bit for bit what `head.embed` gives for them."""
        if len(tokens) > KEEP_ROWS_UP_TO:
            return split_activation(self.head.embed(mx.array(tokens)), None, (len(tokens),))[0]
        rows = self.rows
        missing = [t for t in dict.fromkeys(tokens) if t not in rows]
        if missing:
            self._add(missing)
            self._trim(set(tokens))
        self.misses += len(missing)
        self.hits += len(tokens) - len(missing)
        return Activation(b"".join([rows[t] for t in tokens]), self.dtype, (len(tokens), self.width))

    def _add(self, tokens: list[int]) -> None:
        parts = split_activation(self.head.embed(mx.array(tokens)), None, (1,) * len(tokens), copy=True)
        self.dtype, self.width = parts[0].dtype, parts[0].shape[1]
        for t, a in zip(tokens, parts):
            self.rows[t] = a.data
            self.nbytes += len(a.data)

    def _trim(self, need: set[int]) -> None:
        """Drop the oldest rows while over budget, never one of `need` (the unit being sent)."""
        while self.nbytes > self.budget:
            old = next((t for t in self.rows if t not in need), None)
            if old is None:
                return
            self.nbytes -= len(self.rows.pop(old))
