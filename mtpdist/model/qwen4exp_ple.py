"""qwen4_exp's n-gram embedding (PLE): hashed bigram/trigram ids -> a table -> gated streams.

For each token, the ids of the n-grams ending at it (n = 2..ngram_size; an n-gram never
reaches back across an EOS, and positions before the sequence read as EOS) are hashed by
`heads_per_ngram` independent multiplicative-XOR hashes, each into its own prime-sized slice
of one table. The looked-up rows, concatenated, give a value and a key per stream; each
stream's normed activations gate the value, a dilated depthwise conv adds local context,
and the result is added to every stream. Per sequence it keeps the last ngram_size - 1
token ids and the conv's last (kernel - 1) * ngram_size inputs (`PLEGDNCache`).
"""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .qwen4exp_cache import PLEGDNCache
from .qwen4exp_layers import GroupedRMSNorm, Qwen4Extras

_MASK64 = (1 << 64) - 1
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(v: int) -> int:
    v = (v + _GAMMA) & _MASK64
    v = ((v ^ (v >> 30)) * _M1) & _MASK64
    v = ((v ^ (v >> 27)) * _M2) & _MASK64
    return (v ^ (v >> 31)) & _MASK64


def hash_multipliers(vocab: int, n: int, ple_index: int, seed: int) -> list[int]:
    """The odd multipliers of one PLE layer's hashes (so that token * m stays below 2**63)."""
    half = max(1, (((1 << 63) - 1) // max(vocab, 1)) // 2)
    base = seed + 10007 * ple_index
    return [2 * (_splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % half) + 1 for i in range(n)]


def _is_prime(v: int) -> bool:
    if v < 2 or v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


def head_sizes(base: int, heads: int, ple_index: int) -> list[int]:
    """Each hash head's table slice size: the consecutive primes above `base - 1`, this layer's share."""
    sizes, p, need = [], base - 1, (ple_index + 1) * heads
    while len(sizes) < need:
        p += 1
        while not _is_prime(p):
            p += 1
        sizes.append(p)
    return sizes[ple_index * heads:]


class NGramTable(nn.Module):
    """The hashed table (one `nn.Embedding`, the shards of the release concatenated)."""

    def __init__(self, e: Qwen4Extras, ple_index: int):
        super().__init__()
        self.e = e
        heads = (e.ngram - 1) * e.heads_per_ngram
        sizes = head_sizes(e.ngram_base, heads, ple_index)
        # numpy, not mx: these are derived constants, not parameters to load.
        self._sizes = np.array(sizes, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._mult = np.array(hash_multipliers(e.vocab, e.ngram, ple_index, e.seed), dtype=np.int64)
        rows = -(-int(sum(sizes)) // e.ngram_divisor) * e.ngram_divisor
        self.ngram_embedding = nn.Embedding(rows, e.ple_dim // heads)

    def ids(self, history: np.ndarray) -> np.ndarray:
        """Table rows [L, heads] for each position of a token history [L] (int64)."""
        e, L = self.e, history.shape[0]
        is_eos = history == e.eos
        shifted = [history]
        for s in range(1, e.ngram):
            out = np.full(L, e.eos, dtype=np.int64)
            if L > s:
                # Token q-s stands unless an EOS lies strictly between it and q.
                blocked = np.zeros(L - s, dtype=bool)
                for j in range(1, s):
                    blocked |= is_eos[j:L - s + j]
                out[s:] = np.where(blocked, e.eos, history[:L - s])
            shifted.append(out)
        cols = []
        for n in range(2, e.ngram + 1):
            mixed = shifted[0] * self._mult[0]
            for p in range(1, n):
                mixed = np.bitwise_xor(mixed, shifted[p] * self._mult[p])
            lo = (n - 2) * e.heads_per_ngram
            sizes = self._sizes[lo:lo + e.heads_per_ngram]
            cols.append(np.remainder(mixed[:, None], sizes[None]) + self._offsets[lo:lo + e.heads_per_ngram][None])
        return np.concatenate(cols, axis=1)


class PLE(nn.Module):
    """One layer's n-gram injection into every stream."""

    def __init__(self, e: Qwen4Extras, ple_index: int):
        super().__init__()
        self.e = e
        W = e.hc * e.hidden
        self.ple_embedding = NGramTable(e, ple_index)
        self.key_proj = nn.Linear(e.ple_dim, W, bias=False)
        self.value_proj = nn.Linear(e.ple_dim, e.hidden, bias=False)
        self.norm_key = GroupedRMSNorm(W, e.hidden, e.eps)
        self.norm_query = GroupedRMSNorm(W, e.hidden, e.eps)
        self.norm_conv = GroupedRMSNorm(W, e.hidden, e.eps)
        self.conv1d = nn.Module()
        self.conv1d.weight = mx.zeros((W, e.ple_kernel, 1))   # depthwise, dilation ngram_size
        self.span = (e.ple_kernel - 1) * e.ngram

    def __call__(self, h: mx.array, tokens: np.ndarray, cache: PLEGDNCache | None,
                 keep: Sequence[int] = ()) -> mx.array:
        """Streams h [1, T, n*H] of one sequence and its token ids [T] -> the addition [1, T, n*H]."""
        e, T = self.e, h.shape[1]
        n, H = e.hc, e.hidden
        ctx = e.ngram - 1
        prev = cache.ple_tokens if cache is not None and cache.ple_tokens is not None \
            else np.full(ctx, e.eos, dtype=np.int64)
        history = np.concatenate([prev, tokens.astype(np.int64)])
        rows = mx.array(self.ple_embedding.ids(history)[ctx:])
        emb = self.ple_embedding.ngram_embedding(rows).reshape(1, T, -1)
        key = self.norm_key(self.key_proj(emb)).reshape(1, T, n, H)
        value = self.value_proj(emb)
        query = self.norm_query(h).reshape(1, T, n, H)
        g = (key * query).sum(axis=-1) / math.sqrt(H)
        g = mx.sign(g) * mx.sqrt(mx.maximum(mx.abs(g), 1e-6))
        gated = (mx.sigmoid(g)[..., None] * value[:, :, None, :]).reshape(1, T, n * H)
        normed = self.norm_conv(gated)
        past = cache.ple_conv if cache is not None and cache.ple_conv is not None \
            else mx.zeros((1, self.span, n * H), dtype=normed.dtype)
        xp = mx.concatenate([past, normed], axis=1)
        w = self.conv1d.weight[:, :, 0]                     # [C, K]
        y = sum(w[:, k] * xp[:, k * e.ngram: k * e.ngram + T] for k in range(e.ple_kernel))
        if cache is not None:
            snaps = {p: (history[p:p + ctx], xp[:, p:p + self.span]) for p in keep if 0 < p < T}
            cache.record_ple(history[-ctx:], xp[:, -self.span:], snaps)
        return gated + nn.silu(y)
