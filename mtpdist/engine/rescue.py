"""Drafts for the round after a rejection, made while the rejected round is still in flight.

When a verify round comes back, the next round's drafts take k passes of the MTP head, on
the critical path of a single stream (about a sixth of a round here, and a void stacked
round's whole restart). Where the head's first choice at a position misses, its second
choice is the target more often than not (the demo head: 57-69%), and after a round that
held whole, the bonus token is the head's first choice ~0.87 of the time. So while a round
is out and the coordinator has nothing else to do, the chain is continued, a pass at a
time on a copy of the head's cache, from each position of the round with the token the
round would come back with if it stopped there: a *rescue*. If the round comes back with
that token at that position, the rescue's drafts go out at once and the head's cache
becomes the copy's. Drafts only decide how soon tokens come, never which: greedy only
(sampled drafts must be drawn when they are used).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

# The head's cache is copied for each rescue: not past this many entries (a long context's
# copy would cost more memory than the pass it saves is worth).
MAX_CONTEXT = 16384


@dataclass
class Pick:
    """The chain's state when the draft for a position was picked."""
    offset: int           # entries in the head's cache then
    last: mx.array        # its last output (the hidden input of the next chained entry)
    logits: mx.array      # the draft logits the token was picked from


@dataclass
class Rescue:
    """The chain continued from `token` at `position` on a fork of the head, `depth` drafts."""
    position: int
    token: int | None     # None: the first pass feeds `lead` and takes its first choice
    fork: object
    depth: int
    lead: int | None = None
    drafts: list[int] = field(default_factory=list)
    picks: dict[int, Pick] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.drafts) >= self.depth

    def step(self) -> None:
        """One pass of the head: the next draft."""
        if self.token is None:
            self.token = int(mx.argmax(self.fork.chain(self.lead)).item())
            return
        logits = self.fork.chain(self.drafts[-1] if self.drafts else self.token)
        pos = self.position + len(self.drafts) + 1
        self.picks[pos] = Pick(self.fork.offset, self.fork.last, logits)
        self.drafts.append(int(mx.argmax(logits).item()))


def second_choice(logits: mx.array, first: int) -> int:
    """The likeliest token other than `first`."""
    a, b = mx.argpartition(-logits, kth=1)[:2].tolist()
    return b if a == first else a


class Rescues:
    """One sequence's picks (by position) and the rescues made from them."""

    def __init__(self):
        self.picks: dict[int, Pick] = {}
        self.made: dict[int, Rescue] = {}
        self.adopted = 0           # rounds whose drafts came from a rescue
        self.built = 0             # rescues finished

    def record(self, position: int, drafter, logits: mx.array) -> None:
        self.picks[position] = Pick(drafter.offset, drafter.last, logits)

    def clear(self) -> None:
        self.picks, self.made = {}, {}

    def prune(self, below: int) -> None:
        """Forget picks and rescues of positions before `below` (confirmed)."""
        self.picks = {p: v for p, v in self.picks.items() if p >= below}
        self.made = {p: v for p, v in self.made.items() if p >= below}

    def next_pass(self, drafter, rounds, stacking: bool) -> bool:
        """Advance the likeliest unfinished rescue of the rounds in flight by one pass; False
        when there is none to make. `stacking`: a round may go on top of the last one, so its
        bonus token is already guessed (the rescue takes the second choice, last)."""
        if drafter.offset > MAX_CONTEXT:
            return False
        for i, r in enumerate(rounds):
            step = r.step
            k = len(step.drafts)
            if step.kind != "verify" or not k:
                continue
            p, bonus = step.position, step.position + k + 1
            last = i == len(rounds) - 1
            order = [bonus] if last and not stacking else []
            order += [p + j + 1 for j in range(k)]
            order += [] if last and not stacking else [bonus]
            for pos in order:
                rescue = self.made.get(pos)
                if rescue is None:
                    rescue = self._start(drafter, pos, step, bonus, top=last and not stacking)
                    if rescue is None:
                        continue
                    self.made[pos] = rescue
                if not rescue.done:
                    rescue.step()
                    self.built += rescue.done
                    return True
        return False

    def _start(self, drafter, pos: int, step, bonus: int, top: bool) -> Rescue | None:
        """A rescue at `pos`: after a rejected draft, the second choice there; at the bonus
        position, the first choice (`top`: no round guessed it) or else the second."""
        k = len(step.drafts)
        pick = self.picks.get(pos)
        if pick is None:
            before = self.picks.get(pos - 1)
            if not (pos == bonus and top) or before is None:
                return None
            # The last draft was never chained: feed it first, then take the head's first choice.
            return Rescue(pos, None, drafter.fork(before.offset, before.last), k, lead=step.drafts[-1])
        first = int(mx.argmax(pick.logits).item()) if pos == bonus else step.drafts[pos - step.position - 1]
        token = first if pos == bonus and top else second_choice(pick.logits, first)
        return Rescue(pos, token, drafter.fork(pick.offset, pick.last), k)

    def take(self, position: int, token: int) -> Rescue | None:
        """The finished rescue for `token` at `position`, if one was made."""
        r = self.made.get(position)
        return r if r is not None and r.done and r.token == token else None

