"""One sequence's decoding as a state machine: what to send next, and what a result means.

`next_step()` says which token rows the backbone must run next (a prefill chunk, a plain
decode step, or a verify pass over [pending, d1..dk]). Prefill results come back through
`prefilled()`; every other result is resolved for a whole unit at once by
`rounds.resolve_unit`, which calls `confirm()` and then drafts. The decoder's state changes
only through these methods, so one sequence alone and many in a batch run the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import mlx.core as mx
import numpy as np

from ..model.qwen35 import Head
from .depth import DepthPolicy, FixedDepth
from .logprobs import token_logprobs
from .sampling import Sampler


class Drafter(Protocol):
    """Where drafts come from (the MTP head, or a test oracle)."""
    def extend(self, hidden: mx.array, normed: mx.array, tokens: Sequence[int]) -> mx.array:
        """Add entries (hidden[t], tokens[t]) and return draft logits [V] of the last."""
    def chain(self, token: int) -> mx.array:
        """Add an entry from the head's own last output and `token`; draft logits [V] of it."""
    def rewind(self, n: int) -> None:
        """Drop the last n entries."""


@dataclass
class SpecStats:
    """Drafts verified and accepted in one sequence, with acceptance by draft position."""
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    tried_at: list[int] = field(default_factory=list)      # rounds that drafted >= j+1 tokens
    accepted_at: list[int] = field(default_factory=list)   # of those, rounds whose first j+1 were accepted

    def record(self, depth: int, accepted: int) -> None:
        self.verify_passes += 1
        self.drafted += depth
        self.accepted += accepted
        while len(self.tried_at) < depth:
            self.tried_at.append(0)
            self.accepted_at.append(0)
        for j in range(depth):
            self.tried_at[j] += 1
            self.accepted_at[j] += j < accepted

    def acceptance_by_depth(self) -> list[float]:
        """Cumulative: at depth j, the share of rounds drafting >= j whose first j drafts all held."""
        return [round(a / t, 4) if t else 0.0 for a, t in zip(self.accepted_at, self.tried_at)]


@dataclass(frozen=True)
class Step:
    """One forward of one sequence: rows to run, where snapshots are wanted, tokens undone first."""
    kind: str                  # "prefill" | "decode" | "verify"
    tokens: tuple[int, ...]
    snapshots: tuple[int, ...]  # row counts after which the workers snapshot recurrent state
    position: int              # where the cache stands after `undo`, before these rows
    undo: int = 0              # tokens of the last verify pass rejected, dropped before these rows
    index: int = 0             # prefill chunk number
    drafts: tuple[int, ...] = ()


class SequenceDecoder:
    """Plain or MTP (depth k) decoding of one sequence. Prefill chunks may be in flight together;
    every other step waits for the one before it."""

    def __init__(self, head: Head, sampler: Sampler, prompt: Sequence[int], drafter: Drafter | None = None,
                 depth: DepthPolicy | None = None, chunk: int = 512, start: int = 0,
                 boundaries: Sequence[int] = ()):
        """`start`: the caches (and the drafter's) already hold prompt[:start] (a kept prefix).
        Prefill chunks end at multiples of `chunk` from position 0 and at `boundaries`, whatever
        `start` is: a sequence continued from a kept state runs the same chunks as a fresh one."""
        if not prompt:
            raise ValueError("the prompt is empty")
        self.head, self.sampler, self.drafter = head, sampler, drafter
        self.depth = depth or FixedDepth(1)
        self.prompt = list(prompt)
        self.body = len(self.prompt) - 1  # the last prompt token is the first decode input
        self.chunk, self.start = chunk, start
        self.cuts = sorted({b for b in boundaries if 0 < b < self.body} | {self.body})
        self.chunks: list[tuple[int, int]] = []  # prefill chunks sent, as prompt ranges
        self.chunks_done = 0         # prefill chunks processed (in order)
        self.early: dict[int, mx.array] = {}  # prefill results that came back out of order
        self.position = start        # cache position after everything sent so far
        self.confirmed: list[int] = []  # every token confirmed (may run past what the caller keeps)
        self.undo = 0                # rejected draft rows to drop before the next step
        self.awaiting = False        # a decode/verify step is in flight
        self.pending = self.prompt[-1]
        self.drafts: list[int] = []
        self.qs: list[np.ndarray | None] = []
        self.speculative = 0         # MTP cache entries made from the head's own output
        # Rounds that chose no draft leave their (hidden, normed, tokens) here instead of
        # running the MTP head; the head catches up in one pass when drafting resumes.
        self.backlog: list[tuple[mx.array, mx.array, list[int]]] = []
        self.stats = SpecStats()
        self.round_start = 0.0
        self.logprobs_top: int | None = None  # set: note each confirmed token's logprobs (TokenLogprob)
        self.logprobs: list = []              # those of the tokens returned last, until taken

    @property
    def sent_prefill(self) -> int:
        return self.chunks[-1][1] if self.chunks else self.start

    @property
    def prefilling(self) -> bool:
        return self.chunks_done < len(self.chunks) or self.sent_prefill < self.body

    def peek(self) -> tuple[str, int] | None:
        """(kind, rows) of the step `next_step` would send now, without sending it."""
        if self.sent_prefill < self.body:
            return "prefill", self._chunk_end(self.sent_prefill) - self.sent_prefill
        if self.prefilling or self.awaiting:
            return None
        return ("verify", 1 + len(self.drafts)) if self.drafts else ("decode", 1)

    def _chunk_end(self, s: int) -> int:
        return min((s // self.chunk + 1) * self.chunk, next(c for c in self.cuts if c > s))

    def next_step(self) -> Step | None:
        """The next forward to send, or None while an earlier one must come back first."""
        if self.sent_prefill < self.body:
            s = self.sent_prefill
            e = self._chunk_end(s)
            step = Step("prefill", tuple(self.prompt[s:e]), (), self.position, index=len(self.chunks))
            self.chunks.append((s, e))
            self.position += e - s
            return step
        if self.prefilling or self.awaiting:
            return None
        tokens = (self.pending, *self.drafts)
        kind = "verify" if self.drafts else "decode"
        self.round_start = time.perf_counter()
        step = Step(kind, tokens, tuple(range(1, len(tokens))), self.position - self.undo, self.undo,
                    drafts=tuple(self.drafts))
        self.position = step.position + len(tokens)
        self.undo = 0
        self.awaiting = True
        return step

    def prefilled(self, step: Step, hidden: mx.array, applied=lambda end: None) -> None:
        """Take a prefill chunk's pre-norm hidden [1, T, H]; chunks are applied in order, and
        `applied(end)` hears of each (the prompt position its state now stands at)."""
        self.early[step.index] = hidden
        while self.chunks_done in self.early:
            i = self.chunks_done
            hidden = self.early.pop(i)
            out = [hidden]
            if self.drafter is not None:  # evaluating the logits settles the MTP cache chunk by chunk
                s, e = self.chunks[i]
                out.append(self.drafter.extend(hidden, self.head.norm(hidden), self.prompt[s + 1:e + 1]))
            mx.eval(*out)
            self.chunks_done += 1
            applied(self.chunks[i][1])

    def confirm(self, step: Step, out: list[int], accepted: int) -> tuple[int, int] | None:
        """Record a decode/verify step's confirmed tokens; returns the (depth, accepted) the depth
        policy should learn from, or None."""
        self.awaiting = False
        observe = None
        if step.kind == "verify":
            k = len(step.drafts)
            self.stats.record(k, accepted)
            self.undo = k - accepted
            # The head's own (speculative) entries go; the backbone's verified hiddens replace them.
            self.drafter.rewind(self.speculative)
            self.speculative = 0
            observe = (k, accepted)
        elif self.drafter is not None and (self.stats.verify_passes or self.confirmed):
            observe = (0, 0)                # a round without drafts (depth 0 chosen)
        self.pending = out[-1]
        self.confirmed.extend(out)
        return observe

    def take_backlog(self) -> tuple[mx.array, mx.array, list[int]]:
        """The rows that rounds without drafts left for the MTP head, as one (hidden, normed, tokens)."""
        h, n, t = zip(*self.backlog)
        self.backlog = []
        cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=1))
        return cat(h), cat(n), [x for toks in t for x in toks]

    def note_logprobs(self, logits: mx.array, tokens: list[int]) -> None:
        """When asked for: the target's logprobs of `tokens` (row t of `logits` [T, V] chose tokens[t])."""
        if self.logprobs_top is not None:
            self.logprobs.extend(token_logprobs(logits, tokens, self.logprobs_top))

    def take_logprobs(self) -> list | None:
        """The logprobs noted since the last call (None when not asked for)."""
        if self.logprobs_top is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def settle_drafter(self) -> None:
        """Bring the drafter's cache to where the backbone's ends: speculative entries go, rows
        left by rounds without drafts go in."""
        if self.drafter is None:
            return
        if self.speculative:
            self.drafter.rewind(self.speculative)
            self.speculative = 0
        if self.backlog:
            self.drafter.extend(*self.take_backlog())
        self.drafts, self.qs = [], []
