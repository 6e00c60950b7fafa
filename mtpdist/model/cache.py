"""Per-sequence layer state with one protocol: `offset`, `rewind(n)` and `forget_before(p)`.

`rewind(n)` takes the cache back to `offset - n`. Attention KV caches drop entries;
GatedDeltaNet state cannot be un-folded, so the GDN layer keeps snapshots, by absolute
position, at the ends of passes and after every row the caller asked for, and `rewind`
restores one. Snapshots of several passes may be kept (verify rounds in flight stack up),
until `forget_before` drops those below a position no rewind will reach. Snapshots are
references to arrays MLX already computed: taking them copies nothing.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class AttentionCache(KVCache):
    """mlx-lm's KV cache with the rollback protocol."""

    def rewind(self, n: int) -> None:
        if n < 0 or n > self.offset:
            raise ValueError(f"cannot rewind {n} tokens from a cache at {self.offset}")
        self.trim(n)

    def forget_before(self, position: int) -> None:
        """Nothing to forget: any earlier position can be trimmed back to."""

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def copy(self) -> "AttentionCache":
        """An independent cache holding the same entries (later writes to either stay apart)."""
        c = AttentionCache()
        if self.keys is not None:
            c.keys = mx.contiguous(self.keys[..., :self.offset, :])
            c.values = mx.contiguous(self.values[..., :self.offset, :])
            c.offset = self.offset
        return c


class GDNCache:
    """Conv and SSM state of one GatedDeltaNet layer, plus snapshots by absolute position.

    `snapshots[p]` is the (conv, ssm) state after the first `p` tokens of the sequence; the end
    of every pass is one, so a pass stacked on another can be taken back whole.
    """

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.ssm: mx.array | None = None
        self.offset = 0
        self.snapshots: dict[int, tuple[mx.array, mx.array]] = {}

    def record(self, conv: mx.array, ssm: mx.array, pass_len: int,
               snapshots: dict[int, tuple[mx.array, mx.array]]) -> None:
        """The state after a pass of `pass_len` tokens; `snapshots` are keyed by rows of the pass."""
        start = self.offset
        self.conv, self.ssm = conv, ssm
        self.offset += pass_len
        self.snapshots.update({start + k: v for k, v in snapshots.items()})
        self.snapshots[self.offset] = (conv, ssm)

    def can_rewind(self, n: int) -> bool:
        return n == 0 or (0 < n <= self.offset and self.offset - n in self.snapshots)

    def rewind(self, n: int) -> None:
        if n == 0:
            return
        keep = self.offset - n
        if not self.can_rewind(n):
            raise ValueError(f"no snapshot to go back {n} tokens to position {keep} "
                             f"(snapshots at {sorted(self.snapshots)})")
        self.conv, self.ssm = self.snapshots[keep]
        self.offset = keep
        self.snapshots = {k: v for k, v in self.snapshots.items() if k <= keep}

    def forget_before(self, position: int) -> None:
        """Drop snapshots below `position` (no rewind will go there): their memory is freed.
        They are added in ascending position (a pass's rows, then its end; a rewind keeps the
        order), so those to drop are at the front: no pass over the rest."""
        snaps = self.snapshots
        while snaps:
            first = next(iter(snaps))
            if first >= position:
                return
            del snaps[first]

    def nbytes(self) -> int:
        """State plus its snapshots (they hold memory until forgotten or rewound past)."""
        if self.ssm is None:
            return 0
        return self.ssm.nbytes + self.conv.nbytes + sum(c.nbytes + s.nbytes for p, (c, s) in self.snapshots.items()
                                                        if p != self.offset)

    def copy(self) -> "GDNCache":
        """The same state without snapshots (arrays are immutable: nothing is copied)."""
        c = GDNCache()
        c.conv, c.ssm, c.offset = self.conv, self.ssm, self.offset
        return c

    @property
    def state(self) -> list:
        return [a for a in (self.conv, self.ssm) if a is not None]


def rewind_all(caches, n: int) -> None:
    """Take every layer cache back by `n` tokens."""
    for c in caches:
        c.rewind(n)


def forget_all(caches, position: int) -> None:
    """Drop every layer's snapshots below `position`."""
    for c in caches:
        c.forget_before(position)


def copy_caches(caches) -> list:
    """Independent copies of a sequence's layer caches (a prefix others can start from)."""
    return [c.copy() for c in caches]


def cache_arrays(caches) -> list[mx.array]:
    """The arrays a set of caches holds, for mx.eval."""
    out = []
    for c in caches:
        if isinstance(c, GDNCache):
            out.extend(c.state)
        elif c.keys is not None:
            out.extend([c.keys, c.values])
    return out
