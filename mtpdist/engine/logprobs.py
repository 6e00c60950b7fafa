"""Log-probabilities of confirmed tokens under the target model (OpenAI's `logprobs`).

What is reported is the log-softmax of the target's own logits, in fp32, before any
temperature, top-k, top-p or min-p (as OpenAI reports them): the same numbers whether a
token came from a plain step or was accepted in an MTP verify pass (that pass computes the
target logits of every position it confirms), and whatever the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

MAX_TOP = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One confirmed token's log-probability and the `top` most likely tokens at its position."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), most likely first


def token_logprobs(logits: mx.array, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row t of `logits` [T, V] is the target's distribution that `tokens[t]` was chosen from."""
    x = logits.astype(mx.float32)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, mx.array(list(tokens))[:, None], axis=-1)[:, 0]
    top = min(max(top, 0), MAX_TOP, lp.shape[-1])
    if top == 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen.tolist())]
    ids = mx.argpartition(-lp, kth=top - 1, axis=-1)[:, :top]
    vals = mx.take_along_axis(lp, ids, axis=-1)
    out = []
    for t, v, row_ids, row_vals in zip(tokens, chosen.tolist(), ids.tolist(), vals.tolist()):
        # Most likely first; ties by token id, as argmax breaks them (the greedy choice leads).
        best = sorted(zip(row_ids, row_vals), key=lambda p: (-p[1], p[0]))
        out.append(TokenLogprob(t, v, tuple(best)))
    return out
