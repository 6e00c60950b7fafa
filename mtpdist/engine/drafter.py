"""The model's own MTP head as a drafter, one per sequence."""

from __future__ import annotations

import mlx.core as mx

from ..model.cache import copy_caches, rewind_all
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

    @property
    def offset(self) -> int:
        """Entries in the head's cache."""
        return self.caches[0].offset

    def fork(self, offset: int, last: mx.array) -> "MTPDrafter":
        """An independent drafter whose cache holds this one's first `offset` entries and whose
        next chained entry takes `last` as its hidden input (a branch of the chain)."""
        d = MTPDrafter(self.head, self.mtp, self.post_norm)
        d.caches = copy_caches(self.caches)
        rewind_all(d.caches, d.offset - offset)
        d.last = last
        return d

    def take_branch(self, fork: "MTPDrafter", offset: int, last: mx.array) -> None:
        """Go on from a fork's chain: its first `offset` entries, `last` its output there."""
        fork.rewind(fork.offset - offset)
        self.caches, self.last = fork.caches, last
