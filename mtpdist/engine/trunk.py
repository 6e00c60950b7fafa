"""Where the backbone layers run, behind one small interface.

A `Trunk` takes embedded hidden states for one sequence and returns the last layer's
(pre-final-norm) hidden states; `rewind` undoes the last n tokens of its last forward.
`LocalTrunk` runs a `LayerStack` in this process; the pipeline trunk (coordinator)
sends the same calls to workers.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import mlx.core as mx

from ..model.cache import rewind_all
from ..model.qwen35 import LayerStack


class Trunk(Protocol):
    """Backbone layers for one sequence: forward hidden states, rewind the last pass."""
    def forward(self, hidden: mx.array, keep: Sequence[int] = ()) -> mx.array: ...
    def rewind(self, n: int) -> None: ...
    def close(self) -> None: ...
    @property
    def offset(self) -> int: ...


class LocalTrunk:
    """All (or some) layers in this process, for one sequence."""

    def __init__(self, stack: LayerStack):
        self.stack = stack
        self.caches = stack.make_caches()

    def forward(self, hidden: mx.array, keep: Sequence[int] = ()) -> mx.array:
        # The ragged path with one sequence: the same arithmetic as a batch on a worker.
        return self.stack.ragged(hidden, [(self.caches, hidden.shape[1], tuple(keep))])

    def rewind(self, n: int) -> None:
        rewind_all(self.caches, n)

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def close(self) -> None:
        self.caches = self.stack.make_caches()
