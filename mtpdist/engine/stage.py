"""One pipeline stage's compute: a LayerStack and the sequences it keeps state for.

Called from the worker's single MLX thread only. Every request is checked before any
state changes, so a bad request leaves the sequence as it was.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from ..errors import RequestError
from ..model.cache import GDNCache, cache_arrays
from ..model.qwen35 import LayerStack
from ..wire.types import Activation
from .activations import from_activation, to_activation
from .trunk import LocalTrunk

MAX_KEEP = 16


@dataclass
class StageOutput:
    """One stage's output hidden states, its cache position after, and compute time."""
    hidden: Activation
    position: int
    compute_us: int


class Stage:
    """Layers [start, end) and per-sequence state with LRU eviction under a byte budget."""

    def __init__(self, stack: LayerStack, hidden_size: int, max_sequences: int = 64,
                 state_budget_bytes: int = 8 << 30):
        self.stack, self.hidden_size = stack, hidden_size
        self.max_sequences, self.state_budget = max_sequences, state_budget_bytes
        self.seqs: OrderedDict[str, LocalTrunk] = OrderedDict()
        self.evicted: OrderedDict[str, str] = OrderedDict()
        self.last_used: dict[str, float] = {}  # monotonic time of each sequence's last call

    def expire_idle(self, now: float, ttl: float) -> list[str]:
        """Drop sequences unused for more than `ttl` seconds (a coordinator that crashed never
        releases them); they answer as evicted afterwards. Returns the ids dropped."""
        stale = [s for s in self.seqs if now - self.last_used.get(s, now) > ttl]
        for s in stale:
            del self.seqs[s]
            self.last_used.pop(s, None)
            self.evicted[s] = f"idle for more than {ttl:g} s"
        while len(self.evicted) > 4096:
            self.evicted.popitem(last=False)
        return stale

    def _lookup(self, seq_id: str, position: int) -> LocalTrunk:
        if seq_id in self.seqs:
            self.seqs.move_to_end(seq_id)
            self.last_used[seq_id] = time.monotonic()
            return self.seqs[seq_id]
        if seq_id in self.evicted:
            raise RequestError("RESOURCE_EXHAUSTED", f"sequence {seq_id!r} was evicted ({self.evicted[seq_id]}); "
                                                     "start it again from position 0")
        if position != 0:
            raise RequestError("NOT_FOUND", f"unknown or released sequence {seq_id!r} (a new sequence starts at 0)")
        if not seq_id or len(seq_id) > 128:
            raise RequestError("INVALID_ARGUMENT", "sequence_id must be 1-128 characters")
        trunk = LocalTrunk(self.stack)
        self.seqs[seq_id] = trunk
        self.last_used[seq_id] = time.monotonic()
        self._evict(keep=seq_id)
        return trunk

    def _evict(self, keep: str) -> None:
        while len(self.seqs) > 1 and (len(self.seqs) > self.max_sequences or self.state_bytes() > self.state_budget):
            victim = next(s for s in self.seqs if s != keep)
            reason = "too many sequences" if len(self.seqs) > self.max_sequences else "memory ran short"
            del self.seqs[victim]
            self.last_used.pop(victim, None)
            self.evicted[victim] = reason
            while len(self.evicted) > 4096:
                self.evicted.popitem(last=False)

    def state_bytes(self) -> int:
        return sum(c.nbytes() for t in self.seqs.values() for c in t.caches)

    def forward(self, seq_id: str, position: int, hidden: Activation, rewind: int = 0,
                keep: tuple[int, ...] = ()) -> StageOutput:
        """Undo `rewind` tokens, check the cache stands at `position`, run the chunk."""
        x = from_activation(hidden, self.hidden_size)
        if len(keep) > MAX_KEEP or any(k < 1 or k >= x.shape[0] for k in keep):
            raise RequestError("INVALID_ARGUMENT", f"keep positions {list(keep)} must lie in [1, {x.shape[0] - 1}]")
        trunk = self._lookup(seq_id, position)
        self._check_rewind(seq_id, trunk, rewind)
        if trunk.offset - rewind != position:
            raise RequestError("FAILED_PRECONDITION",
                               f"sequence {seq_id!r}: cache stands at {trunk.offset - rewind}"
                               f"{f' after rewinding {rewind}' if rewind else ''}, request expects {position}")
        t0 = time.perf_counter()
        trunk.rewind(rewind)
        out = trunk.forward(x[None], keep)[0]
        mx.eval(out, *cache_arrays(trunk.caches))
        us = int((time.perf_counter() - t0) * 1e6)
        if self.state_bytes() > self.state_budget:
            self._evict(keep=seq_id)
        return StageOutput(to_activation(out), trunk.offset, us)

    def rewind(self, seq_id: str, n: int, position: int) -> int:
        trunk = self._lookup_existing(seq_id)
        self._check_rewind(seq_id, trunk, n)
        if trunk.offset - n != position:
            raise RequestError("FAILED_PRECONDITION", f"sequence {seq_id!r}: rewinding {n} from {trunk.offset} "
                                                      f"lands at {trunk.offset - n}, not {position}")
        trunk.rewind(n)
        return trunk.offset

    def _lookup_existing(self, seq_id: str) -> LocalTrunk:
        if seq_id not in self.seqs:
            self._lookup(seq_id, position=-1)  # raises the right error
        return self.seqs[seq_id]

    @staticmethod
    def _check_rewind(seq_id: str, trunk: LocalTrunk, n: int) -> None:
        if n == 0:
            return
        gdn = next((c for c in trunk.caches if isinstance(c, GDNCache)), None)
        ok = n <= trunk.offset and (gdn is None or (gdn.pass_len - n) in gdn.snapshots)
        if not ok:
            raise RequestError("FAILED_PRECONDITION",
                               f"sequence {seq_id!r}: cannot rewind {n} tokens (no snapshot for that position)")

    def release(self, seq_id: str) -> bool:
        self.evicted.pop(seq_id, None)
        self.last_used.pop(seq_id, None)
        return self.seqs.pop(seq_id, None) is not None
