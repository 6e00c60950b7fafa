"""Test helpers: run token streams, and an oracle drafter that knows the greedy answer."""

from __future__ import annotations

import mlx.core as mx

from mtpdist.engine.depth import FixedDepth
from mtpdist.engine.sampling import Sampler, SamplingParams
from mtpdist.engine.speculative import MTPDrafter, Pipeline, plain_tokens, speculative_tokens
from mtpdist.engine.trunk import LocalTrunk


def take(gen, n):
    out = []
    for step in gen:
        out.extend(step)
        if len(out) >= n:
            gen.close()
            return out[:n]


def plain_greedy(parts, prompt, n, step=512, trunk=None):
    pipe = Pipeline(parts.head, trunk or LocalTrunk(parts.stack))
    return take(plain_tokens(pipe, prompt, Sampler(SamplingParams()), step), n)


def spec_greedy(parts, prompt, n, step=512, drafter=None, post_norm=True, trunk=None, depth=1):
    drafter = drafter or MTPDrafter(parts.head, parts.mtp, post_norm)
    pipe = Pipeline(parts.head, trunk or LocalTrunk(parts.stack), drafter)
    policy = depth if hasattr(depth, "choose") else FixedDepth(depth)
    return take(speculative_tokens(pipe, prompt, Sampler(SamplingParams()), step, policy), n), pipe.stats


class OracleDrafter:
    """Drafts the true greedy token, except where `wrong(i)` says to draft a wrong one.

    MTP entry i pairs (h_i, x_{i+1}) and predicts x_{i+2}; the oracle counts entries.
    """

    def __init__(self, reference: list[int], vocab: int, wrong=lambda i: False):
        self.ref, self.vocab, self.wrong, self.n = reference, vocab, wrong, 0

    def extend(self, hidden, normed, tokens):
        self.n += len(tokens)
        target = self.ref[self.n + 1] if self.n + 1 < len(self.ref) else 0
        if self.wrong(self.n):
            target = (target + 1) % self.vocab
        return mx.where(mx.arange(self.vocab) == target, 10.0, 0.0)

    def chain(self, token):
        return self.extend(None, None, [token])

    def rewind(self, n):
        self.n -= n
