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
    undo: int                    # rows undone after the last step of the log
    mtp_caches: list | None      # the MTP head's cache at the same point (None: plain)


class PrefixIndex:
    """The coordinator's LRU of kept states (workers keep their own LRU within memory)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self.hits = self.misses = 0

    def add(self, entry: PrefixEntry) -> None:
        self.entries[entry.name] = entry
        self.entries.move_to_end(entry.name)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

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
        self.entries.pop(name, None)

    def clear(self) -> None:
        self.entries.clear()


def prompt_entry(name: str, prompt: Sequence[int], decoder, log: Sequence[Step]) -> PrefixEntry:
    """The end-of-prompt state a sequence kept while prefilling (its rows carried `keep_as`)."""
    return PrefixEntry(name, tuple(prompt[:decoder.body]), tuple(log), 0, mtp_copy(decoder))


def turn_entry(name: str, prompt: Sequence[int], decoder, log: Sequence[Step]) -> PrefixEntry:
    """A finished turn's state: the prompt and every confirmed token but the last (the next
    turn's input), undone past its last verify pass's rejected rows."""
    decoder.settle_drafter()
    return PrefixEntry(name, (*prompt, *decoder.confirmed[:-1]), tuple(log), decoder.undo, mtp_copy(decoder))


def mtp_copy(decoder):
    """A copy of the decoder's MTP-head cache (None without one)."""
    from ..model.cache import copy_caches
    caches = getattr(decoder.drafter, "caches", None)
    return copy_caches(caches) if caches is not None else None
