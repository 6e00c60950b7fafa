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
