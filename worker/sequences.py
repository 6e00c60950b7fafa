"""A worker's sequence store: its LayerStack and the state it keeps for each sequence.

Called from the worker's single MLX thread only. Every request is checked before any
state changes, so a bad request leaves the sequence as it was.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from mtpdist.errors import RequestError
from mtpdist.model.cache import cache_arrays, copy_caches, forget_all, rewind_all
from mtpdist.model.qwen35 import LayerStack
from mtpdist.wire.activations import wire_bits
from mtpdist.wire.types import SequenceRows

MAX_KEEP = 16
# The state budget is checked (a scan of every cache) once this many rows have run since the last
# check, not after every decode step: it may be overrun by at most these rows' cache entries.
BUDGET_CHECK_ROWS = 64


class _State:
    """One sequence's caches for this worker's layers."""

    def __init__(self, stack: LayerStack):
        self.caches = stack.make_caches()
        self.epoch = 0      # the newest epoch of rows seen: older rows are stale

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def rewind(self, n: int) -> None:
        if n:
            rewind_all(self.caches, n)

    def can_rewind(self, n: int) -> bool:
        return 0 <= n <= self.offset and all(c.can_rewind(n) for c in self.caches if hasattr(c, "can_rewind"))


@dataclass
class StoreOutput:
    """One stage's output rows, each sequence's cache position after, and compute time."""
    hidden: mx.array
    positions: list[int]
    compute_us: int
    bits: mx.array | None = None    # hidden's wire_bits, evaluated with it (no eval of its own to send)


class SequenceStore:
    """Layers [start, end) and per-sequence state with LRU eviction under a byte budget."""

    def __init__(self, stack: LayerStack, hidden_size: int, max_sequences: int = 64,
                 state_budget_bytes: int = 8 << 30):
        self.stack, self.hidden_size = stack, hidden_size
        self.max_sequences, self.state_budget = max_sequences, state_budget_bytes
        self.seqs: OrderedDict[str, _State] = OrderedDict()
        self.evicted: OrderedDict[str, str] = OrderedDict()
        # Kept states that new sequences can start from (a finished turn, a prompt), LRU.
        self.prefixes: OrderedDict[str, list] = OrderedDict()
        self.max_prefixes = 256
        self.prefix_bytes = 0
        self.last_used: dict[str, float] = {}  # monotonic time of each sequence's last call
        self.prefix_used: dict[str, float] = {}  # monotonic time each kept prefix was kept or last forked
        self.unchecked_rows = 0                  # rows run since the state budget was last checked
        self.untidy: list[tuple[str, int]] = []  # (sequence, floor) run since the last `tidy`

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

    def expire_prefixes(self, now: float, ttl: float) -> list[str]:
        """Drop kept prefixes neither kept nor forked for more than `ttl` seconds (those of a
        coordinator that crashed are never used again); a later Fork of one gets NOT_FOUND
        and its request prefills. Returns the names dropped."""
        stale = [n for n in self.prefixes if now - self.prefix_used.get(n, now) > ttl]
        for n in stale:
            self._drop_prefix(n)
        return stale

    def _existing(self, seq_id: str, position: int) -> _State | None:
        """The sequence's state; None for a valid new sequence; raises otherwise. Changes nothing."""
        if seq_id in self.seqs:
            return self.seqs[seq_id]
        if seq_id in self.evicted:
            raise RequestError("state_lost", f"sequence {seq_id!r} was evicted ({self.evicted[seq_id]}); "
                                                     "start it again from position 0")
        if position != 0:
            raise RequestError("state_lost", f"unknown or released sequence {seq_id!r} (a new sequence starts at 0)")
        if not seq_id or len(seq_id) > 128:
            raise RequestError("invalid", "sequence_id must be 1-128 characters")
        return None

    def ready(self, rows: SequenceRows) -> bool:
        """Whether the work before these rows has been applied (chunks of one sequence can
        reach a stage out of order); a request that can never run counts as ready and fails."""
        state = self.seqs.get(rows.sequence_id)
        if state is None:
            return rows.position == 0 or rows.sequence_id in self.evicted
        # A newer epoch goes back (the work it follows was applied before it was sent); an
        # older one is stale and skipped.
        return rows.epoch != state.epoch or state.offset >= rows.position

    def _evict(self, keep: set[str]) -> None:
        self.unchecked_rows = 0
        # Kept prefixes go first: losing one costs a prefill later, never a request.
        while self.prefixes and (len(self.prefixes) > self.max_prefixes or self.state_bytes() > self.state_budget):
            self._drop_prefix(next(iter(self.prefixes)))
        while len(self.seqs) > len(keep) and (len(self.seqs) > self.max_sequences
                                              or self.state_bytes() > self.state_budget):
            victim = next(s for s in self.seqs if s not in keep)
            reason = "too many sequences" if len(self.seqs) > self.max_sequences else "memory ran short"
            del self.seqs[victim]
            self.last_used.pop(victim, None)
            self.evicted[victim] = reason
            while len(self.evicted) > 4096:
                self.evicted.popitem(last=False)

    def state_bytes(self) -> int:
        """Bytes of every live sequence's state (snapshots included) and of kept prefixes."""
        return sum(c.nbytes() for t in self.seqs.values() for c in t.caches) + self.prefix_bytes

    def _keep_prefix(self, name: str, caches: list) -> None:
        # A kept prefix never changes after this, so its size is added once, not recounted per forward.
        self._drop_prefix(name)
        self.prefixes[name] = caches
        self.prefix_bytes += sum(c.nbytes() for c in caches)
        self.prefix_used[name] = time.monotonic()

    def _drop_prefix(self, name: str) -> None:
        caches = self.prefixes.pop(name, None)
        self.prefix_used.pop(name, None)
        if caches is not None:
            self.prefix_bytes -= sum(c.nbytes() for c in caches)

    def _name_ok(self, name: str) -> None:
        if not name or len(name) > 160:
            raise RequestError("invalid", "a prefix name must be 1-160 characters")

    def save(self, seq_id: str, name: str) -> None:
        """Keep a copy of a sequence's current state under `name`."""
        self._name_ok(name)
        state = self._lookup_existing(seq_id)
        self._keep_prefix(name, copy_caches(state.caches))
        self._evict(keep={seq_id})

    def keep(self, seq_id: str, length: int, name: str) -> int:
        """End a sequence but keep its state (taken back to `length` tokens) under `name`; its length."""
        self._name_ok(name)
        state = self._lookup_existing(seq_id)
        self._check_rewind(seq_id, state, state.offset - length)
        state.rewind(state.offset - length)
        del self.seqs[seq_id]
        self.last_used.pop(seq_id, None)
        self._keep_prefix(name, copy_caches(state.caches))
        self._evict(keep=set())
        return state.offset

    def fork(self, name: str, seq_id: str) -> int:
        """Start sequence `seq_id` from the kept state `name`; returns where it stands."""
        if name not in self.prefixes:
            raise RequestError("state_lost", f"no kept prefix {name!r} (evicted or never kept)")
        if seq_id in self.seqs:
            raise RequestError("exists", f"sequence {seq_id!r} exists")
        self._existing(seq_id, 0)  # checks the id
        state = _State(self.stack)
        state.caches = copy_caches(self.prefixes[name])
        self.prefixes.move_to_end(name)
        self.prefix_used[name] = time.monotonic()
        self.seqs[seq_id] = state
        self.last_used[seq_id] = time.monotonic()
        self._evict(keep={seq_id})
        return state.offset

    def check(self, sequences: Sequence[SequenceRows], rows: int) -> None:
        """Refuse a malformed Forward before anything runs."""
        if not sequences:
            raise RequestError("invalid", "a Forward must name at least one sequence")
        if len({s.sequence_id for s in sequences}) != len(sequences):
            raise RequestError("invalid", "a sequence appears twice in one Forward")
        if any(s.tokens < 1 for s in sequences) or sum(s.tokens for s in sequences) != rows:
            raise RequestError("invalid", f"the sequences' token counts must add up to the {rows} "
                                                   "rows of hidden, each at least 1")
        for s in sequences:
            if s.keep_as:
                self._name_ok(s.keep_as)
            if len(s.snapshots) > MAX_KEEP or any(k < 1 or k >= s.tokens for k in s.snapshots):
                raise RequestError("invalid",
                                   f"snapshot positions {list(s.snapshots)} must lie in [1, {s.tokens - 1}]")

    def forward(self, sequences: Sequence[SequenceRows], x: mx.array, checked: bool = False) -> StoreOutput:
        """Run several sequences' rows [N, H] as one forward. Rows of a newer epoch first take
        their cache back to `position`; rows of an older epoch are stale and come back as zeros;
        the others must find their cache at `position`. Every check comes before any state changes
        (`checked`: the caller has run `check` on these rows already)."""
        if not checked:
            self.check(sequences, x.shape[0])
        states, live = [], []
        for s in sequences:
            state = self._existing(s.sequence_id, s.position)
            offset = 0 if state is None else state.offset
            if state is not None and s.epoch < state.epoch:
                states.append(state)          # a voided round still in the pipe: skipped quietly
                continue
            back = offset - s.position if state is not None and s.epoch > state.epoch else 0
            if back:
                self._check_rewind(s.sequence_id, state, back)
            elif offset != s.position:
                raise RequestError("conflict", f"sequence {s.sequence_id!r} (epoch {s.epoch}): cache stands at "
                                               f"{offset}, request expects {s.position}")
            states.append(state)
            live.append(len(states) - 1)
        for i in live:
            s = sequences[i]
            if states[i] is None:
                states[i] = self.seqs[s.sequence_id] = _State(self.stack)
            state = states[i]
            self.seqs.move_to_end(s.sequence_id)
            self.last_used[s.sequence_id] = time.monotonic()
            state.rewind(state.offset - s.position)
            state.epoch = s.epoch
            self.untidy.append((s.sequence_id, min(s.floor or s.position, s.position)))
        t0 = time.perf_counter()
        out, bits = self._run(sequences, states, live, x)
        us = int((time.perf_counter() - t0) * 1e6)
        for i in live:
            if sequences[i].keep_as:
                self.save(sequences[i].sequence_id, sequences[i].keep_as)
        self.unchecked_rows += x.shape[0]
        return StoreOutput(out, [t.offset for t in states], us, bits)

    def tidy(self) -> None:
        """What forwards leave for after their output has gone on (call it then, before the next
        forward): snapshots below each sequence's floor are dropped, and the state budget is
        checked once BUDGET_CHECK_ROWS rows have run. Freeing snapshots costs a few us a
        recurrent layer (~0.05 ms for 24 of them on a CPU), which a stage's output need not wait for."""
        done, self.untidy = self.untidy, []
        for seq_id, floor in done:
            state = self.seqs.get(seq_id)
            if state is not None:
                forget_all(state.caches, floor)
        if self.unchecked_rows >= BUDGET_CHECK_ROWS or len(self.seqs) > self.max_sequences:
            self._evict(keep={seq_id for seq_id, _ in done})

    def _run(self, sequences: Sequence[SequenceRows], states: list, live: list[int],
             x: mx.array) -> tuple[mx.array, mx.array]:
        """The live sequences' rows through the layers (stale rows stay zeros), and their wire bits."""
        if len(live) == len(sequences):
            out = self.stack.ragged(x[None], [(t.caches, s.tokens, s.snapshots) for t, s in zip(states, sequences)])[0]
            bits = wire_bits(out)
            mx.eval(bits, *(a for t in states for a in cache_arrays(t.caches)))
            return out, bits
        starts = [0]
        for s in sequences:
            starts.append(starts[-1] + s.tokens)
        parts = [mx.zeros((s.tokens, x.shape[1]), dtype=x.dtype) for s in sequences]
        if live:
            xs = mx.concatenate([x[starts[i]:starts[i + 1]] for i in live], axis=0)
            y = self.stack.ragged(xs[None], [(states[i].caches, sequences[i].tokens, sequences[i].snapshots)
                                             for i in live])[0]
            r = 0
            for i in live:
                parts[i] = y[r:r + sequences[i].tokens]
                r += sequences[i].tokens
        out = mx.concatenate(parts, axis=0)
        bits = wire_bits(out)
        mx.eval(bits, *(a for i in live for a in cache_arrays(states[i].caches)))
        return out, bits

    def _lookup_existing(self, seq_id: str) -> _State:
        if seq_id not in self.seqs:
            self._existing(seq_id, position=-1)  # raises the right error
        return self.seqs[seq_id]

    @staticmethod
    def _check_rewind(seq_id: str, state: _State, n: int) -> None:
        if not state.can_rewind(n):
            raise RequestError("conflict", f"sequence {seq_id!r}: cannot go back {n} tokens to position "
                                           f"{state.offset - n} (no snapshot there)")

    def release(self, seq_id: str) -> bool:
        self.evicted.pop(seq_id, None)
        self.last_used.pop(seq_id, None)
        return self.seqs.pop(seq_id, None) is not None
