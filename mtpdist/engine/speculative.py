"""Token streams: plain decoding and MTP speculative decoding (depth k) over one trunk.

Both yield lists of newly confirmed token ids. The caller stops by closing the
generator (max tokens, EOS, stop strings). See REFERENCE.md section 3 for the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx

from ..model.cache import rewind_all
from ..model.qwen35 import Head, MTPHead
from .decoder import Drafter, SequenceDecoder, SpecStats, Step, drive
from .depth import DepthPolicy
from .sampling import Sampler
from .trunk import Trunk


class MTPDrafter:
    """The model's own MTP head with its KV cache; one per sequence.

    Chained drafts (depth k) feed the head's own normed output back as the hidden input,
    as the backbone's post-norm hidden is fed for the first draft.
    """

    def __init__(self, head: Head, mtp: MTPHead, post_norm: bool = True):
        self.head, self.mtp, self.post_norm = head, mtp, post_norm
        self.caches = mtp.make_caches()
        self.last: mx.array | None = None

    def extend(self, hidden, normed, tokens):
        h = normed if self.post_norm else hidden
        z = self.mtp(h, self.head.embed(mx.array([list(tokens)])), self.caches)
        self.last = z[:, -1:]
        return self.head.logits(z[0, -1])

    def chain(self, token: int) -> mx.array:
        return self.extend(self.last, self.last, [token])

    def rewind(self, n: int) -> None:
        if n:
            rewind_all(self.caches, n)


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


def speculative_tokens(p: Pipeline, prompt: Sequence[int], sampler: Sampler, step: int = 512,
                       depth: DepthPolicy | None = None) -> Iterator[list[int]]:
    """MTP at depth k: verify [pending, d1..dk] in one pass; rewind the rejected tail."""
    dec = SequenceDecoder(p.head, sampler, prompt, p.drafter, depth, step)
    p.stats = dec.stats

    def forward(s: Step) -> mx.array:
        p.trunk.rewind(s.rewind)
        return p.trunk.forward(p.head.embed(mx.array([list(s.tokens)])), s.keep)
    yield from drive(dec, forward)
