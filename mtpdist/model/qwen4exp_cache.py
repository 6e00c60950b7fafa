"""Per-sequence state that qwen4_exp adds, with the same `offset` / `rewind(n)` protocol.

- `IndexedKVCache`: an attention layer's KV cache plus its sparse-attention indexer's keys:
  one raw key per token and one pooled key per complete block of `ratio` tokens (normed and
  roped, computed once when the block completes). Rewinding truncates all three together:
  a block that loses a token loses its pooled key and is pooled again when it completes.
- `PLEGDNCache`: a GatedDeltaNet layer that also carries the n-gram embedding (PLE): its
  token history (the last ngram_size - 1 ids) and its dilated conv's history. Both are
  snapshotted after every kept position of a pass, like the GDN state, so a rejected draft
  costs only local restores.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import AttentionCache, GDNCache

_STEP = 256  # index-key buffers grow in steps, like mlx-lm's KV cache


def _grow(buf: mx.array | None, used: int, need: int, width: int, dtype) -> mx.array:
    """A buffer with room for `need` rows whose first `used` rows are those of `buf`."""
    if buf is not None and buf.shape[0] >= need:
        return buf
    cap = ((need + _STEP - 1) // _STEP) * _STEP
    new = mx.zeros((cap, width), dtype=dtype)
    if buf is not None and used:
        new[:used] = buf[:used]
    return new


class IndexedKVCache(AttentionCache):
    """KV cache plus the indexer's raw keys [tokens, d] and pooled block keys [blocks, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.ikeys: mx.array | None = None
        self.pooled: mx.array | None = None
        self.n_pooled = 0
        self.ratio = 1

    def append_index_keys(self, keys: mx.array, start: int) -> None:
        """Store one pass's raw indexer keys [T, d] at token positions [start, start + T)."""
        end = start + keys.shape[0]
        self.ikeys = _grow(self.ikeys, start, end, keys.shape[-1], keys.dtype)
        self.ikeys[start:end] = keys

    def pooled_keys(self, blocks: int, ratio: int, finish) -> mx.array:
        """Pooled keys of the first `blocks` complete blocks; blocks not pooled yet are pooled
        from the raw keys (mean in float32) and passed through `finish(keys, block_ids)`."""
        self.ratio = ratio
        if blocks > self.n_pooled:
            s, d = self.n_pooled, self.ikeys.shape[-1]
            raw = self.ikeys[s * ratio: blocks * ratio].reshape(blocks - s, ratio, d)
            new = finish(raw.astype(mx.float32).mean(axis=1).astype(raw.dtype), mx.arange(s, blocks))
            self.pooled = _grow(self.pooled, s, blocks, d, new.dtype)
            self.pooled[s:blocks] = new
            self.n_pooled = blocks
        return self.pooled[:blocks]

    def rewind(self, n: int) -> None:
        super().rewind(n)
        self.n_pooled = min(self.n_pooled, self.offset // self.ratio)

    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.ikeys, self.pooled) if a is not None)
        return super().nbytes() + extra

    def copy(self) -> "IndexedKVCache":
        c = IndexedKVCache()
        base = AttentionCache.copy(self)
        c.keys, c.values, c.offset, c.ratio = base.keys, base.values, base.offset, self.ratio
        if self.ikeys is not None:
            c.ikeys = mx.contiguous(self.ikeys[:self.offset])
        if self.pooled is not None and self.n_pooled:
            c.pooled, c.n_pooled = mx.contiguous(self.pooled[:self.n_pooled]), self.n_pooled
        return c


class PLEGDNCache(GDNCache):
    """GDN state plus the PLE token history (numpy int64) and conv history [1, L, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.ple_tokens: np.ndarray | None = None
        self.ple_conv: mx.array | None = None
        self.ple_snapshots: dict[int, tuple[np.ndarray, mx.array]] = {}

    def record_ple(self, tokens: np.ndarray, conv: mx.array, snapshots: dict) -> None:
        """The PLE state after a pass and after each kept row of it (set before the GDN's record,
        so `offset` is still where the pass began); kept by absolute position like the GDN's."""
        start = self.offset
        self.ple_tokens, self.ple_conv = tokens, conv
        self.ple_snapshots.update({start + k: v for k, v in snapshots.items()})

    def record(self, conv, ssm, pass_len, snapshots) -> None:
        super().record(conv, ssm, pass_len, snapshots)
        self.ple_snapshots[self.offset] = (self.ple_tokens, self.ple_conv)

    def can_rewind(self, n: int) -> bool:
        return super().can_rewind(n) and (n == 0 or self.offset - n in self.ple_snapshots)

    def rewind(self, n: int) -> None:
        keep = self.offset - n
        if n and keep not in self.ple_snapshots:
            raise ValueError(f"no PLE snapshot to go back {n} tokens to position {keep}")
        super().rewind(n)   # checks and restores the GDN state first
        if n:
            self.ple_tokens, self.ple_conv = self.ple_snapshots[keep]
            self.ple_snapshots = {k: v for k, v in self.ple_snapshots.items() if k <= keep}

    def forget_before(self, position: int) -> None:
        super().forget_before(position)
        self.ple_snapshots = {k: v for k, v in self.ple_snapshots.items() if k >= position}

    def nbytes(self) -> int:
        extra = 0 if self.ple_conv is None else self.ple_conv.nbytes + sum(
            c.nbytes for p, (_, c) in self.ple_snapshots.items() if p != self.offset)
        return super().nbytes() + extra

    def copy(self) -> "PLEGDNCache":
        c = PLEGDNCache()
        c.conv, c.ssm, c.offset = self.conv, self.ssm, self.offset
        c.ple_tokens, c.ple_conv = self.ple_tokens, self.ple_conv
        return c

    @property
    def state(self) -> list:
        return super().state + ([self.ple_conv] if self.ple_conv is not None else [])
