"""One sequence's decoding as a state machine: what to send next, and what a result means.

`next_step()` says which token rows the backbone must run next (a prefill chunk, a plain
decode step, or a verify pass over [pending, d1..dk]). Prefill results come back through
`prefilled()`; every other result is resolved for a whole unit at once by
`rounds.resolve_unit`, which calls `confirm()` and then drafts. The decoder's state changes
only through these methods, so one sequence alone and many in a batch run the same code.

Verify rounds may be in flight together (`window` > 1, to keep every stage of a pipeline
busy for one stream): a round sent while others are out assumes they will be accepted whole,
its first row guessing the bonus token of the one before (the MTP chain continued). A round
that comes back with a rejection voids every round sent after it: the epoch goes up, and the
next step takes the workers' caches back to the confirmed position.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import mlx.core as mx
import numpy as np

from ..model.qwen35 import Head
from .depth import DepthPolicy, FixedDepth
from .logprobs import token_logprobs
from .sampling import Sampler


# Rows held rounds may leave for the head while the chain goes on (then it stops stacking, and the
# chain is rebuilt once the rounds in flight are back): bounds that memory in a long run of holds.
MAX_BACKLOG = 256


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
    max_rounds_in_flight: int = 0
    speculative_rounds: int = 0     # rounds sent while an earlier one was still out
    voided_rounds: int = 0          # of those, rounds a rejection before them made void
    wasted_rows: int = 0            # rows of voided rounds
    drafted_ahead: int = 0          # stacked rounds whose every token was drafted before they could go

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

    def record_void(self, rounds: int, rows: int) -> None:
        self.voided_rounds += rounds
        self.wasted_rows += rows

    def acceptance_by_depth(self) -> list[float]:
        """Cumulative: at depth j, the share of rounds drafting >= j whose first j drafts all held."""
        return [round(a / t, 4) if t else 0.0 for a, t in zip(self.accepted_at, self.tried_at)]


@dataclass(frozen=True)
class Step:
    """One forward of one sequence: rows to run, where its cache must stand, where snapshots go.
    Steps compare by what they compute, not by the epoch they were sent under."""
    kind: str                  # "prefill" | "decode" | "verify"
    tokens: tuple[int, ...]
    snapshots: tuple[int, ...]  # row counts after which the workers snapshot recurrent state
    position: int              # where the cache stands before these rows
    index: int = 0             # prefill chunk number
    drafts: tuple[int, ...] = ()
    epoch: int = field(default=0, compare=False)   # a newer epoch takes the cache back to `position`
    floor: int = field(default=0, compare=False)   # no later step goes back before this (0: position)


@dataclass
class Round:
    """A decode/verify step in flight, with its drafts' distributions and when it was sent."""
    step: Step
    qs: list
    sent: float
    stacked: bool = False       # sent while an earlier round was in flight


class SequenceDecoder:
    """Plain or MTP (depth k) decoding of one sequence. Prefill chunks may be in flight together;
    up to `window` verify rounds may be in flight together, each after the first speculative."""

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
        self.position = start        # where the next step starts (the cache, once rejected rows are gone)
        self.epoch = 0               # bumped whenever the workers must go back: rows past `position` are void
        self.confirmed: list[int] = []  # every token confirmed (may run past what the caller keeps)
        self.rounds: deque[Round] = deque()   # decode/verify steps in flight, oldest first
        self.window = 1              # rounds allowed in flight (the scheduler's policy sets it)
        self.spec_logits: mx.array | None = None  # draft logits for the row after the last round sent
        self.ahead: tuple[list[int], list] = ([], [])  # the next stacked round's tokens (and qs), drafted early
        self.pending = self.prompt[-1]
        self.drafts: list[int] = []
        self.qs: list[np.ndarray | None] = []
        self.speculative = 0         # MTP cache entries made from the head's own output
        # Rounds that chose no draft leave their (hidden, normed, tokens) here instead of
        # running the MTP head; the head catches up in one pass when drafting resumes.
        self.backlog: list[tuple[mx.array, mx.array, list[int]]] = []
        self.stats = SpecStats()
        self.round_start: float | None = 0.0   # when the round just confirmed started (None: stacked)
        self.ready_at: float | None = None     # when this sequence's last round was resolved
        self.logprobs_top: int | None = None  # set: note each confirmed token's logprobs (TokenLogprob)
        self.logprobs: list = []              # those of the tokens returned last, until taken

    @property
    def sent_prefill(self) -> int:
        return self.chunks[-1][1] if self.chunks else self.start

    @property
    def awaiting(self) -> bool:
        """A decode/verify step is in flight."""
        return bool(self.rounds)

    @property
    def prefilling(self) -> bool:
        return self.chunks_done < len(self.chunks) or self.sent_prefill < self.body

    def peek(self) -> tuple[str, int] | None:
        """(kind, rows) of the step `next_step` would send now, without sending it."""
        if self.sent_prefill < self.body:
            return "prefill", self._chunk_end(self.sent_prefill) - self.sent_prefill
        if self.prefilling:
            return None
        if self.rounds:
            return ("verify", len(self.rounds[-1].step.tokens)) if self._can_stack() else None
        return ("verify", 1 + len(self.drafts)) if self.drafts else ("decode", 1)

    def _can_stack(self) -> bool:
        """Whether another round may go out on top of those in flight now."""
        return len(self.rounds) < self.window and self._stackable()

    def _stackable(self) -> bool:
        """Whether rounds may stack on those in flight (they carry drafts). Not for a seeded
        sampled request: whether a round stacks depends on timing, and its draws would too, so
        its output would not be reproducible from the seed."""
        p = self.sampler.params
        return (self.window > 1 and self.drafter is not None and bool(self.rounds[-1].step.drafts)
                and (p.greedy or p.seed is None) and sum(len(t) for _, _, t in self.backlog) < MAX_BACKLOG)

    def _chunk_end(self, s: int) -> int:
        return min((s // self.chunk + 1) * self.chunk, next(c for c in self.cuts if c > s))

    def next_step(self) -> Step | None:
        """The next forward to send, or None while an earlier one must come back first."""
        if self.sent_prefill < self.body:
            s = self.sent_prefill
            e = self._chunk_end(s)
            step = Step("prefill", tuple(self.prompt[s:e]), (), self.position, index=len(self.chunks),
                        epoch=self.epoch)
            self.chunks.append((s, e))
            self.position += e - s
            return step
        if self.prefilling:
            return None
        if self.rounds:
            return self._stacked_step() if self._can_stack() else None
        tokens = (self.pending, *self.drafts)
        kind = "verify" if self.drafts else "decode"
        return self._send(Step(kind, tokens, tuple(range(1, len(tokens))), self.position,
                               drafts=tuple(self.drafts), epoch=self.epoch, floor=self.position), self.qs)

    def _send(self, step: Step, qs: list) -> Step:
        self.rounds.append(Round(step, qs, time.perf_counter(), stacked=bool(self.rounds)))
        self.position = step.position + len(step.tokens)
        self.stats.max_rounds_in_flight = max(self.stats.max_rounds_in_flight, len(self.rounds))
        return step

    def _stacked_step(self) -> Step:
        """A round on top of those in flight, as if they will be accepted whole: its first row
        guesses the last one's bonus token, the rest continue the MTP chain."""
        k = len(self.rounds[-1].step.drafts)
        self.stats.drafted_ahead += len(self.ahead[0]) > k
        while len(self.ahead[0]) <= k:
            self._draft_one()
        (tokens, qs), self.ahead = self.ahead, ([], [])
        self.stats.speculative_rounds += 1
        floor = self.rounds[0].step.position    # the round before may still be rejected anywhere
        return self._send(Step("verify", tuple(tokens), tuple(range(1, k + 1)), self.position,
                               drafts=tuple(tokens[1:]), epoch=self.epoch, floor=floor), qs[1:])

    def draft_ahead(self) -> bool:
        """While the window is full: draft one more token of the next stacked round, so that it
        goes out as soon as a round comes back. False when there is nothing to draft. (With no
        rebuild of the chain while rounds hold, these are the tokens it would draft then.)"""
        if not self.rounds or not self._stackable() or len(self.ahead[0]) > len(self.rounds[-1].step.drafts):
            return False
        self._draft_one()
        return True

    def _draft_one(self) -> None:
        """The next token of the next stacked round: the first guesses the last round's bonus."""
        if self.spec_logits is None:
            self._chain(self.rounds[-1].step.tokens[-1:])
        tokens, qs = self.ahead
        q = None if not tokens or self.sampler.params.greedy else self.sampler.probs(self.spec_logits)
        tokens.append(int(mx.argmax(self.spec_logits).item()) if q is None else self.sampler.draw(q))
        qs.append(q)
        self._chain(tokens[-1:])

    def _chain(self, tokens: Sequence[int]) -> None:
        """Feed known tokens through the MTP chain; keep the draft logits after the last."""
        for t in tokens:
            self.spec_logits = self.drafter.chain(t)
            self.speculative += 1

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

    def expects(self, step: Step) -> bool:
        """Whether a returning decode/verify step is the oldest round in flight (else it was voided)."""
        return bool(self.rounds) and self.rounds[0].step is step

    def in_flight(self, step: Step) -> bool:
        """Whether a decode/verify step is still awaited (it may come back before an older one)."""
        return any(r.step is step for r in self.rounds)

    def round_qs(self, step: Step) -> list:
        """The distributions the step's drafts were drawn from (None where greedy)."""
        return self.rounds[0].qs if self.expects(step) else []

    def confirm(self, step: Step, out: list[int], accepted: int) -> tuple[int, int, bool | None] | None:
        """Record the oldest round's confirmed tokens; returns the (depth, accepted, guessed) the
        depth policy should learn from, or None. Rounds sent after it stay in flight only if it
        held whole and the next one guessed its bonus token (`guessed`: None when no round was
        stacked on it or a draft failed); otherwise they are void."""
        done = self.rounds.popleft()
        # A stacked round waited behind the one before it: its wall time is not a round's latency.
        # A round's cost is the time from the end of the one before it: with other sequences in the
        # batch that includes waiting for a slot, which deeper rounds (more rows) lengthen.
        self.round_start = None if done.stacked else min(done.sent, self.ready_at or done.sent)
        observe = None
        k = len(step.drafts)
        if step.kind == "verify":
            self.stats.record(k, accepted)
            observe = (k, accepted, None)
        elif self.drafter is not None and (self.stats.verify_passes or self.confirmed):
            observe = (0, 0, None)          # a round without drafts (depth 0 chosen)
        self.pending = out[-1]
        self.confirmed.extend(out)
        holds = accepted == k and (not self.rounds or self.rounds[0].step.tokens[0] == out[-1])
        if k and accepted == k and self.rounds:
            observe = (k, accepted, holds)  # the stacked round's guess of the bonus was draft k + 1
        if not holds:
            void = list(self.rounds)
            self.stats.record_void(len(void), sum(len(r.step.tokens) for r in void))
            self.rounds.clear()
            self.position = step.position + accepted + 1
            self.epoch += 1         # rows past the confirmed position are void on every worker
        if holds and self.rounds:
            # The chain the rounds in flight came from goes on, so the next stacked round needs only
            # its own drafts; the verified rows wait in the backlog until the chain is rebuilt.
            # (Rebuilding it here cost a pass per token in flight and did not raise acceptance.)
            return observe
        if self.drafter is not None and (step.kind == "verify" or self.speculative):
            # The head's own (speculative) entries go; the backbone's verified hiddens replace them.
            self.drafter.rewind(self.speculative)
            self.speculative = 0
            self.spec_logits = None
            self.ahead = ([], [])
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
        self.spec_logits, self.ahead = None, ([], [])
