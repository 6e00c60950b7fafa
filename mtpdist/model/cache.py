"""Per-sequence layer state with one protocol: `offset` and `rewind(n)`.

`rewind(n)` undoes the last n tokens of the most recent forward pass. Attention KV
caches drop entries; GatedDeltaNet state cannot be un-folded, so the GDN layer records
a snapshot after every position the caller asked for and `rewind` restores one. The
snapshots are references to arrays MLX already computed: taking them copies nothing.
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
    """Conv and SSM state of one GatedDeltaNet layer, plus snapshots of the last pass.

    `snapshots[i]` is the (conv, ssm) state after the first `keep[i]` tokens of the last
    forward; `pass_len` is how many tokens that forward had.
    """

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.ssm: mx.array | None = None
        self.offset = 0
        self.snapshots: dict[int, tuple[mx.array, mx.array]] = {}
        self.pass_len = 0

    def record(self, conv: mx.array, ssm: mx.array, pass_len: int,
               snapshots: dict[int, tuple[mx.array, mx.array]]) -> None:
        self.conv, self.ssm = conv, ssm
        self.offset += pass_len
        self.pass_len = pass_len
        self.snapshots = snapshots

    def rewind(self, n: int) -> None:
        if n == 0:
            return
        keep = self.pass_len - n
        if keep not in self.snapshots:
            raise ValueError(
                f"no snapshot to rewind {n} of {self.pass_len} tokens "
                f"(snapshots after {sorted(self.snapshots)})"
            )
        self.conv, self.ssm = self.snapshots[keep]
        self.offset -= n
        self.pass_len = keep
        self.snapshots = {k: v for k, v in self.snapshots.items() if k < keep}

    def nbytes(self) -> int:
        """State plus the snapshots of the last pass (they hold memory until the next pass)."""
        if self.ssm is None:
            return 0
        return self.ssm.nbytes + self.conv.nbytes + sum(c.nbytes + s.nbytes for c, s in self.snapshots.values())

    def copy(self) -> "GDNCache":
        """The same state without snapshots (arrays are immutable: nothing is copied)."""
        c = GDNCache()
        c.conv, c.ssm, c.offset = self.conv, self.ssm, self.offset
        return c

    @property
    def state(self) -> list:
        return [a for a in (self.conv, self.ssm) if a is not None]


def rewind_all(caches, n: int) -> None:
    """Undo the last `n` tokens of the last pass on every layer cache."""
    for c in caches:
        c.rewind(n)


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
