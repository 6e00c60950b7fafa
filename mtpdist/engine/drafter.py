"""The model's own MTP head as a drafter, one per sequence."""

from __future__ import annotations

import mlx.core as mx

from ..model.cache import rewind_all
from ..model.qwen35 import Head, MTPHead


class MTPDrafter:
    """The MTP head with its KV cache for one sequence.

    Chained drafts (depth k) feed the head's own normed output back as the hidden input,
    as the backbone's post-norm hidden is fed for the first draft. Many sequences' drafters
    of one head run together through `rounds.resolve_unit` (one ragged pass per position).
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
