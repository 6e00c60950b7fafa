"""One sequence's decoding as a state machine: what to send next, and what a result means.

`next_step()` says which token rows the backbone must run next (a prefill chunk, a plain
decode step, or a verify pass over [pending, d1..dk]); `on_result()` takes the backbone's
hidden states for that step and returns the tokens it confirms. A synchronous loop over a
trunk (`drive`) and the coordinator's scheduler (many sequences in flight) run the same
machine, so their output is the same. The algorithm is REFERENCE.md section 3 at depth k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

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
    """One forward of one sequence: rows to run, snapshots wanted, rewind carried first."""
    kind: str                  # "prefill" | "decode" | "verify"
    tokens: tuple[int, ...]
    keep: tuple[int, ...]
    position: int              # where the cache stands after `rewind`, before these rows
    rewind: int = 0
    index: int = 0             # prefill chunk number
    drafts: tuple[int, ...] = ()


class SequenceDecoder:
    """Plain or MTP (depth k) decoding of one sequence. Prefill chunks may be in flight together;
    every other step waits for the one before it."""

    def __init__(self, head: Head, sampler: Sampler, prompt: Sequence[int], drafter: Drafter | None = None,
                 depth: DepthPolicy | None = None, chunk: int = 512, start: int = 0):
        """`start`: the caches (and the drafter's) already hold prompt[:start] (a kept prefix)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        self.head, self.sampler, self.drafter = head, sampler, drafter
        self.depth = depth or FixedDepth(1)
        self.prompt = list(prompt)
        self.body = len(self.prompt) - 1  # the last prompt token is the first decode input
        self.chunk, self.start = chunk, start
        self.chunks: list[tuple[int, int]] = []  # prefill chunks sent, as prompt ranges
        self.done = 0                # prefill chunks processed (in order)
        self.early: dict[int, mx.array] = {}  # prefill results that came back out of order
        self.position = start        # cache position after everything sent so far
        self.confirmed: list[int] = []  # every token confirmed (may run past what the caller keeps)
        self.rewind = 0              # tokens to undo before the next step (a rejected draft)
        self.waiting = False         # a non-prefill step is in flight
        self.pending = self.prompt[-1]
        self.drafts: list[int] = []
        self.qs: list[np.ndarray | None] = []
        self.speculative = 0         # MTP cache entries made from the head's own output
        # Rounds that chose no draft leave their (hidden, normed, tokens) here instead of
        # running the MTP head; the head catches up in one pass when drafting resumes.
        self.backlog: list[tuple[mx.array, mx.array, list[int]]] = []
        self.stats = SpecStats()
        self._round_start = 0.0
        self.logprobs_top: int | None = None  # set: note each confirmed token's logprobs (TokenLogprob)
        self.logprobs: list = []              # those of the tokens returned last, until taken

    @property
    def sent_prefill(self) -> int:
        return self.chunks[-1][1] if self.chunks else self.start

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.chunks) or self.sent_prefill < self.body

    def peek(self) -> tuple[str, int] | None:
        """(kind, rows) of the step `next_step` would send now, without sending it."""
        if self.sent_prefill < self.body:
            return "prefill", min(self.chunk, self.body - self.sent_prefill)
        if self.prefilling or self.waiting:
            return None
        return ("verify", 1 + len(self.drafts)) if self.drafts else ("decode", 1)

    def next_step(self, max_rows: int | None = None) -> Step | None:
        """The next forward to send, or None while an earlier one must come back first.
        `max_rows` caps a prefill chunk (the scheduler's token budget)."""
        if self.sent_prefill < self.body:
            s = self.sent_prefill
            e = min(s + min(self.chunk, max_rows or self.chunk), self.body)
            step = Step("prefill", tuple(self.prompt[s:e]), (), self.position, index=len(self.chunks))
            self.chunks.append((s, e))
            self.position += e - s
            return step
        if self.prefilling or self.waiting:
            return None
        if self.drafts:
            tokens, kind = (self.pending, *self.drafts), "verify"
            self._round_start = time.perf_counter()
        else:
            tokens, kind = (self.pending,), "decode"
            self._round_start = time.perf_counter()
        step = Step(kind, tokens, tuple(range(1, len(tokens))), self.position - self.rewind, self.rewind,
                    drafts=tuple(self.drafts))
        self.position = step.position + len(tokens)
        self.rewind = 0
        self.waiting = True
        return step

    def on_result(self, step: Step, hidden: mx.array) -> list[int]:
        """Take the backbone's pre-norm hidden [1, T, H] for `step`; return confirmed tokens."""
        if step.kind == "prefill":
            self.early[step.index] = hidden
            while self.done in self.early:
                self._prefilled(self.done, self.early.pop(self.done))
                self.done += 1
            return []
        self.waiting = False
        normed = self.head.norm(hidden)
        if step.kind == "verify":
            out = self._verified(step, hidden, normed)
        else:
            logits = self.head.logits(normed[0, -1])
            out = [self.sampler.sample(logits)]
            self.note_logprobs(logits[None], out)
            self.pending = out[0]
            if self.drafter is not None:
                if self.stats.verify_passes or self.confirmed:  # a round without drafts (depth 0 chosen)
                    self.depth.observe(0, 0, time.perf_counter() - self._round_start)
                self._extend_and_draft(hidden, normed, out)
        self.confirmed.extend(out)
        return out

    def take_backlog(self) -> tuple[mx.array, mx.array, list[int]]:
        """The rows that rounds without drafts left for the MTP head, as one (hidden, normed, tokens)."""
        h, n, t = zip(*self.backlog)
        self.backlog = []
        cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=1))
        return cat(h), cat(n), [x for toks in t for x in toks]

    def _extend_and_draft(self, hidden: mx.array, normed: mx.array, tokens: list[int]) -> None:
        self.backlog.append((hidden, normed, list(tokens)))
        k = self.depth.choose()
        if k == 0:
            self.drafts, self.qs = [], []
            return
        self._draft(self.drafter.extend(*self.take_backlog()), k)

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

    def _prefilled(self, i: int, hidden: mx.array) -> None:
        out = [hidden]
        if self.drafter is not None:  # evaluating the logits settles the MTP cache chunk by chunk
            s, e = self.chunks[i]
            out.append(self.drafter.extend(hidden, self.head.norm(hidden), self.prompt[s + 1:e + 1]))
        mx.eval(*out)

    def _verified(self, step: Step, hidden: mx.array, normed: mx.array) -> list[int]:
        drafts, k = list(step.drafts), len(step.drafts)
        logits = self.head.logits(normed[0])            # [k+1, V]: target at pending, d1, ..., dk
        if self.sampler.params.greedy:
            target = mx.argmax(logits, axis=-1).tolist()
            a = next((j for j in range(k) if target[j] != drafts[j]), k)
            out = drafts[:a] + [target[a]]
        else:
            a, out = k, None
            for j in range(k):
                ok, tok = self.sampler.verify(self.sampler.probs(logits[j]), drafts[j], self.qs[j])
                if not ok:
                    a, out = j, drafts[:j] + [tok]
                    break
            if out is None:
                out = drafts + [self.sampler.sample(logits[k])]
        self.note_logprobs(logits[:len(out)], out)
        self.stats.record(k, a)
        self.rewind = k - a
        self.pending = out[-1]
        # The head's own (speculative) entries go; the backbone's verified hiddens replace them.
        self.drafter.rewind(self.speculative)
        self.speculative = 0
        self._extend_and_draft(hidden[:, :a + 1], normed[:, :a + 1], out)
        self.depth.observe(k, a, time.perf_counter() - self._round_start)
        return out

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

    def _draft(self, logits: mx.array, k: int) -> None:
        self.drafts, self.qs = [], []
        for j in range(k):
            if self.sampler.params.greedy:
                d, q = int(mx.argmax(logits).item()), None
            else:
                q = self.sampler.probs(logits)
                d = self.sampler.draw(q)
            self.drafts.append(d)
            self.qs.append(q)
            if j + 1 < k:
                logits = self.drafter.chain(d)
                self.speculative += 1


def drive(decoder: SequenceDecoder, forward: Callable[[Step], mx.array]) -> Iterator[list[int]]:
    """Run a decoder one step at a time; `forward(step)` returns the backbone's hidden [1, T, H]."""
    while True:
        step = decoder.next_step()
        out = decoder.on_result(step, forward(step))
        if out:
            yield out
