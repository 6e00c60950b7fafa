"""Qwen3.5/3.6 split into the parts that live on different machines.

- `LayerStack`: a contiguous range of decoder layers (what a worker holds).
- `Head`: embedding, final norm and lm_head (what the coordinator holds).
- `MTPHead`: the model's own multi-token-prediction head (also the coordinator's).
Only math lives here; sequencing (prefill, verify, rollback) is the engine's job.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from . import rowstable
from .config import ModelConfig
from .layers import DecoderLayer, Segment, make_cache


class LayerStack(nn.Module):
    """Decoder layers [start, end) of a model, with per-sequence caches made on demand."""

    def __init__(self, config: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {config.num_hidden_layers} layers")
        args = config.text_args()
        self.start, self.end = start, end
        self.layers = [DecoderLayer(args, config.is_linear(i)) for i in range(start, end)]

    def make_caches(self) -> list:
        return [make_cache(layer) for layer in self.layers]

    def __call__(self, h: mx.array, caches: list, keep: Sequence[int] = ()) -> mx.array:
        """Run hidden states [B, T, H] through the layers; GDN layers snapshot after `keep`."""
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cache, keep)
        return h

    def ragged(self, h: mx.array, sequences: Sequence[tuple[list, int, tuple[int, ...]]]) -> mx.array:
        """Several sequences' rows [1, N, H] as one forward; `sequences` holds each one's
        (caches, rows, keep) in row order. Each sequence's output equals running it alone."""
        n = h.shape[1]
        h = rowstable.pad_rows(h)  # strict row-stable mode: every pass takes the same kernels
        for i, layer in enumerate(self.layers):
            h = layer.ragged(h, [Segment(caches[i], rows, tuple(keep)) for caches, rows, keep in sequences])
        return h if h.shape[1] == n else h[:, :n]


class Head(nn.Module):
    """Token embedding, final norm and output projection (tied or not)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        args = config.text_args()
        self.tied = config.tie_word_embeddings
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not self.tied:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.embed_tokens(tokens)

    def logits(self, normed: mx.array) -> mx.array:
        """Logits from already-normed hidden states ([..., H] -> [..., V]; a single [H] row too)."""
        if normed.ndim == 1:
            # MLX's CUDA quantized matmul (qmv, taken for few rows) reads the output's
            # shape(-2), which a 1-D row lacks: "IndexError: SmallVector out of range".
            return self.logits(normed[None])[0]
        return rowstable.padded(self._project, normed)

    def _project(self, normed: mx.array) -> mx.array:
        if self.tied:
            return self.embed_tokens.as_linear(normed)
        return self.lm_head(normed)


class MTPHead(nn.Module):
    """Predicts token t+2 from the backbone's hidden state at t and the embedding of t+1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        args = config.text_args()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(H, eps=eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = [DecoderLayer(args, linear=False) for _ in range(max(1, config.mtp_num_hidden_layers))]
        self.norm = nn.RMSNorm(H, eps=eps)

    def make_caches(self) -> list:
        return [make_cache(layer) for layer in self.layers]

    def __call__(self, hidden: mx.array, next_embed: mx.array, caches: list) -> mx.array:
        """hidden [B,T,H] at positions t, next_embed [B,T,H] of tokens t+1 -> normed [B,T,H]."""
        e = self.pre_fc_norm_embedding(next_embed)
        h = self.pre_fc_norm_hidden(hidden)
        z = self.fc(mx.concatenate([e, h], axis=-1))
        for layer, cache in zip(self.layers, caches):
            z = layer(z, cache)
        return self.norm(z)

    def ragged(self, hidden: mx.array, next_embed: mx.array, sequences: Sequence[tuple[list, int]]) -> mx.array:
        """Several sequences' rows [1, N, H] at once, each on its own caches ((caches, rows) in order)."""
        e = self.pre_fc_norm_embedding(next_embed)
        h = self.pre_fc_norm_hidden(hidden)
        z = self.fc(mx.concatenate([e, h], axis=-1))
        for i, layer in enumerate(self.layers):
            z = layer.ragged(z, [Segment(caches[i], rows) for caches, rows in sequences])
        return self.norm(z)
