"""Token streams: plain decoding and depth-1 MTP speculative decoding.

Both yield lists of newly confirmed token ids. The caller stops by closing the
generator (max tokens, EOS, stop strings). See REFERENCE.md section 3 for the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import mlx.core as mx
import numpy as np

from ..model.qwen35 import Head, MTPHead
from .sampling import Sampler
from .trunk import Trunk


@dataclass
class SpecStats:
    """Drafts verified and accepted in one sequence."""
    drafted: int = 0
    accepted: int = 0


class Drafter(Protocol):
    """Where drafts come from (the MTP head, or a test oracle)."""
    def extend(self, hidden: mx.array, normed: mx.array, tokens: Sequence[int]) -> mx.array:
        """Add MTP entries (hidden[t], tokens[t]) and return draft logits [V] of the last."""


class MTPDrafter:
    """The model's own MTP head with its KV cache; one per sequence."""

    def __init__(self, head: Head, mtp: MTPHead, post_norm: bool = True):
        self.head, self.mtp, self.post_norm = head, mtp, post_norm
        self.caches = mtp.make_caches()

    def extend(self, hidden, normed, tokens):
        h = normed if self.post_norm else hidden
        z = self.mtp(h, self.head.embed(mx.array([list(tokens)])), self.caches)
        return self.head.logits(z[0, -1])


@dataclass
class Pipeline:
    """Everything one sequence decodes with: head, trunk and (optionally) a drafter."""

    head: Head
    trunk: Trunk
    drafter: Drafter | None = None
    stats: SpecStats = field(default_factory=SpecStats)

    def run(self, tokens: Sequence[int], keep: Sequence[int] = ()) -> tuple[mx.array, mx.array]:
        """Backbone over tokens -> (pre-norm hidden, normed hidden), both [1, T, H]."""
        h = self.trunk.forward(self.head.embed(mx.array([list(tokens)])), keep)
        return h, self.head.norm(h)


def prefill(p: Pipeline, prompt: Sequence[int], step: int) -> None:
    """Backbone over prompt[:-1] in chunks; the MTP cache gets (h_i, x_{i+1}) pairs."""
    for s in range(0, len(prompt) - 1, step):
        chunk = prompt[s : min(s + step, len(prompt) - 1)]
        h, n = p.run(chunk)
        out = [h]
        if p.drafter is not None:  # evaluating its logits also settles the MTP cache, chunk by chunk
            out.append(p.drafter.extend(h, n, prompt[s + 1 : s + 1 + len(chunk)]))
        mx.eval(*out)


def plain_tokens(p: Pipeline, prompt: Sequence[int], sampler: Sampler, step: int = 512) -> Iterator[list[int]]:
    """One token per backbone step; greedy steps overlap graph building with compute."""
    prefill(p, prompt, step)
    if sampler.params.greedy:
        nxt = _greedy_step(p, mx.array([prompt[-1]]))
        mx.async_eval(nxt)
        while True:
            following = _greedy_step(p, nxt)
            mx.async_eval(following)
            yield [int(nxt.item())]
            nxt = following
    tok = prompt[-1]
    while True:
        _, n = p.run([tok])
        tok = sampler.sample(p.head.logits(n[0, -1]))
        yield [tok]


def _greedy_step(p: Pipeline, tok: mx.array) -> mx.array:
    h = p.trunk.forward(p.head.embed(tok[None]))
    return mx.argmax(p.head.logits(p.head.norm(h[:, -1])), axis=-1)


def speculative_tokens(p: Pipeline, prompt: Sequence[int], sampler: Sampler, step: int = 512) -> Iterator[list[int]]:
    """Depth-1 MTP: verify [pending, draft] in one pass; on rejection rewind one token."""
    greedy = sampler.params.greedy
    prefill(p, prompt, step)
    h, n = p.run([prompt[-1]])                       # bootstrap
    pending = sampler.sample(p.head.logits(n[0, -1]))
    yield [pending]
    draft_logits = p.drafter.extend(h, n, [pending])
    while True:
        d, q = _draft(sampler, draft_logits)
        h, n = p.run([pending, d], keep=(1,))
        logits = p.head.logits(n[0])                 # [2, V]: target at pending, at d
        p.stats.drafted += 1
        if greedy:
            target = mx.argmax(logits, axis=-1).tolist()
            ok, tok = target[0] == d, target[0]
        else:
            ok, tok = sampler.verify(sampler.probs(logits[0]), d, q)
        if ok:
            p.stats.accepted += 1
            bonus = target[1] if greedy else sampler.sample(logits[1])
            yield [d, bonus]
            draft_logits = p.drafter.extend(h, n, [d, bonus])
            pending = bonus
        else:
            p.trunk.rewind(1)
            yield [tok]
            draft_logits = p.drafter.extend(h[:, :1], n[:, :1], [tok])
            pending = tok


def _draft(sampler: Sampler, logits: mx.array) -> tuple[int, np.ndarray | None]:
    if sampler.params.greedy:
        return int(mx.argmax(logits).item()), None
    q = sampler.probs(logits)
    return sampler.draw(q), q
