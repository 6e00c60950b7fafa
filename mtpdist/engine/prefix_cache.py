"""Kept states that a new request can continue from: the end of a prompt, the end of a turn.

GatedDeltaNet state cannot be cut at an arbitrary token, so only whole kept states are
reusable: a request may start from an entry whose tokens are a prefix of its prompt. Each
entry remembers the steps that built it, so a sequence started from it can still be
replayed exactly after a worker is lost, and a copy of the MTP head's cache at that point.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from .decoder import Step


@dataclass(frozen=True)
class PrefixEntry:
    """A state the workers keep under `name`, covering `tokens`."""
    name: str
    tokens: tuple[int, ...]
    log: tuple[Step, ...]        # the steps (as sent) that built it, for exact replay
    mtp_caches: list | None      # the MTP head's cache at the same point (None: plain)

    @property
    def nbytes(self) -> int:
        """What the entry holds on the coordinator (its copy of the MTP head's cache)."""
        return sum(c.nbytes() for c in self.mtp_caches) if self.mtp_caches else 0


class PrefixIndex:
    """The coordinator's LRU of kept states within a count and a byte budget (workers keep their
    own LRU within their memory; an entry they dropped is found out at Fork and skipped)."""

    def __init__(self, capacity: int = 64, max_bytes: int = 2 << 30):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def add(self, entry: PrefixEntry) -> None:
        self.drop(entry.name)
        self.entries[entry.name] = entry
        self.bytes += entry.nbytes
        while len(self.entries) > self.capacity or (self.bytes > self.max_bytes and len(self.entries) > 1):
            self.bytes -= self.entries.popitem(last=False)[1].nbytes
        if self.bytes > self.max_bytes:        # one entry alone over the budget is not kept either
            self.clear()

    def match(self, prompt: Sequence[int], need_mtp: bool) -> PrefixEntry | None:
        """The longest entry whose tokens start `prompt` and leave at least its last token."""
        best = None
        for e in self.entries.values():
            n = len(e.tokens)
            if n < len(prompt) and (best is None or n > len(best.tokens)) and (e.mtp_caches is not None or
                                                                                not need_mtp):
                if tuple(prompt[:n]) == e.tokens:
                    best = e
        if best is None:
            self.misses += 1
        else:
            self.hits += 1
            self.entries.move_to_end(best.name)
        return best

    def drop(self, name: str) -> None:
        e = self.entries.pop(name, None)
        if e is not None:
            self.bytes -= e.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def boundary_entry(name: str, prompt: Sequence[int], end: int, decoder, log: Sequence[Step]) -> PrefixEntry:
    """The state a sequence kept while prefilling, at prompt position `end` (a message boundary
    or the end of its prompt: the chunk ending there carried `keep_as`)."""
    return PrefixEntry(name, tuple(prompt[:end]), tuple(log), mtp_copy(decoder))


def turn_entry(name: str, prompt: Sequence[int], decoder, log: Sequence[Step]) -> PrefixEntry:
    """A finished turn's state: the prompt and every confirmed token but the last (the next
    turn's input), without its last verify pass's rejected rows."""
    decoder.settle_drafter()
    return PrefixEntry(name, (*prompt, *decoder.confirmed[:-1]), tuple(log), mtp_copy(decoder))


def mtp_copy(decoder):
    """A copy of the decoder's MTP-head cache (None without one)."""
    from ..model.cache import copy_caches
    caches = getattr(decoder.drafter, "caches", None)
    return copy_caches(caches) if caches is not None else None
