"""qwen4_exp (Qwen3.8-Flash-Next) split into the parts that live on different machines.

Same roles and calls as `qwen35`'s LayerStack / Head / MTPHead, so the engine runs both.
What crosses a stage boundary is the hyper-connection residual: `hc` streams of the model
width side by side, plus `ID_COLS` columns carrying each row's token id (base-256 digits,
exact in bf16/fp16/fp32), because the n-gram embedding on a GDN layer needs the ids on
whichever stage owns that layer. `ModelConfig.hidden_size` is that full row width.

`Head.norm` returns the lm_head's input (the final mixer's output, width H) followed by the
streams it came from; `Head.logits` reads the first H features, and the MTP head reads the
streams (it is fed the target's pre-mixer residual). The MTP head returns the same layout,
so its chained drafts feed its own pre-mixer streams back, as the release's drafter does.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import GDNCache
from .config import ID_COLS, ModelConfig
from .layers import Segment, SparseMoeBlock
from .qwen4exp_cache import IndexedKVCache, PLEGDNCache
from .qwen4exp_layers import (GroupedRMSNorm, HyperConnection, IndexedAttention, Qwen4Extras,
                              Qwen4GatedDeltaNet, add_block)
from .qwen4exp_ple import PLE



def encode_ids(tokens: mx.array, dtype) -> mx.array:
    """Token ids [..., T] -> [..., T, 3] base-256 digits."""
    t = tokens.astype(mx.int32)
    return mx.stack([t % 256, (t // 256) % 256, t // 65536], axis=-1).astype(dtype)


def decode_ids(cols: mx.array) -> np.ndarray:
    """The digit columns [..., 3] -> token ids (numpy int64, flattened over rows)."""
    d = np.rint(np.asarray(cols.astype(mx.float32))).astype(np.int64).reshape(-1, ID_COLS)
    return d[:, 0] + 256 * d[:, 1] + 65536 * d[:, 2]


class DecoderLayer(nn.Module):
    """One qwen4_exp layer: [PLE] -> hyper-connection -> GDN or indexed attention ->
    hyper-connection -> MoE."""

    def __init__(self, args, e: Qwen4Extras, linear: bool, ple_index: int | None = None):
        super().__init__()
        self.is_linear = linear
        if linear:
            self.linear_attn = Qwen4GatedDeltaNet(args, e)
        else:
            self.self_attn = IndexedAttention(args, e)
        self.mlp = SparseMoeBlock(args)
        self.has_ple = ple_index is not None
        if self.has_ple:
            self.ple = PLE(e, ple_index)
        self.attn_hyper_connection = HyperConnection(e)
        self.mlp_hyper_connection = HyperConnection(e)

    def ragged(self, h: mx.array, tokens: np.ndarray | None, segments: Sequence[Segment]) -> mx.array:
        """Streams [1, N, n*H] of several sequences back to back (token ids [N] if PLE)."""
        if self.has_ple:
            adds, s = [], 0
            for seg in segments:
                adds.append(self.ple(h[:, s:s + seg.rows], tokens[s:s + seg.rows], seg.cache, seg.keep))
                s += seg.rows
            h = h + (adds[0] if len(adds) == 1 else mx.concatenate(adds, axis=1))
        x, inject = self.attn_hyper_connection(h)
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = add_block(h, mixer.ragged(x, segments), inject)
        x, inject = self.mlp_hyper_connection(h)
        return add_block(h, self.mlp(x), inject)

    def make_cache(self):
        if not self.is_linear:
            return IndexedKVCache()
        return PLEGDNCache() if self.has_ple else GDNCache()


class LayerStack(nn.Module):
    """Decoder layers [start, end); rows are [streams | token-id columns]."""

    def __init__(self, config: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {config.num_hidden_layers} layers")
        e, args = Qwen4Extras.from_text(config.text_config), config.text_args()
        self.start, self.end, self.width = start, end, e.hc * e.hidden
        self.layers = [DecoderLayer(args, e, config.is_linear(i),
                                    e.ple_layers.index(i) if i in e.ple_layers else None)
                       for i in range(start, end)]
        self.needs_tokens = any(layer.has_ple for layer in self.layers)

    def make_caches(self) -> list:
        return [layer.make_cache() for layer in self.layers]

    def __call__(self, h: mx.array, caches: list, keep: Sequence[int] = ()) -> mx.array:
        return self.ragged(h, [(caches, h.shape[1], tuple(keep))])

    def ragged(self, h: mx.array, sequences: Sequence[tuple[list, int, tuple[int, ...]]]) -> mx.array:
        """Several sequences' rows [1, N, W] as one forward (see qwen35.LayerStack.ragged)."""
        streams, ids = h[..., :self.width], h[..., self.width:]
        tokens = decode_ids(ids) if self.needs_tokens else None
        for i, layer in enumerate(self.layers):
            streams = layer.ragged(streams, tokens, [Segment(c[i], rows, tuple(keep)) for c, rows, keep in sequences])
        return mx.concatenate([streams, ids.astype(streams.dtype)], axis=-1)


class Head(nn.Module):
    """Token embedding (copied into every stream), the final stream mixer, lm_head."""

    weight_prefixes = ("model.embed_tokens.", "model.hyper_connection_mixer.", "lm_head.")

    def __init__(self, config: ModelConfig):
        super().__init__()
        e = Qwen4Extras.from_text(config.text_config)
        self.e, self.tied = e, config.tie_word_embeddings
        self.embed_tokens = nn.Embedding(e.vocab, e.hidden)
        self.hyper_connection_mixer = HyperConnection(e, inject=False)
        if not self.tied:
            self.lm_head = nn.Linear(e.hidden, e.vocab, bias=False)

    def embed(self, tokens: mx.array) -> mx.array:
        x = self.embed_tokens(tokens)
        return mx.concatenate([mx.tile(x, (1,) * (x.ndim - 1) + (self.e.hc,)), encode_ids(tokens, x.dtype)], axis=-1)

    def norm(self, hidden: mx.array) -> mx.array:
        """[streams | ids] -> [mixer output (H) | streams]."""
        streams = hidden[..., :self.e.hc * self.e.hidden]
        return mx.concatenate([self.hyper_connection_mixer(streams)[0], streams], axis=-1)

    def logits(self, normed: mx.array) -> mx.array:
        if normed.ndim == 1:
            return self.logits(normed[None])[0]   # see qwen35.Head.logits
        x = normed[..., :self.e.hidden]
        return self.embed_tokens.as_linear(x) if self.tied else self.lm_head(x)


class MTPHead(nn.Module):
    """The release's MTP head: the target's streams and the next token's embedding, fused per
    stream, through one indexed-attention MoE layer with its own hyper-connections and mixer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, args = Qwen4Extras.from_text(config.text_config), config.text_args()
        self.e = e
        W = e.hc * e.hidden
        self.pre_fc_norm_embedding = GroupedRMSNorm(e.hidden, None, e.eps)
        self.pre_fc_norm_hidden = GroupedRMSNorm(W, None, e.eps)   # one norm over all streams
        self.fc_embedding = nn.Linear(e.hidden, e.hidden, bias=False)
        self.fc_hidden = nn.Linear(e.hidden, e.hidden, bias=False)
        self.layers = [DecoderLayer(args, e, linear=False) for _ in range(max(1, config.mtp_num_hidden_layers))]
        self.hyper_connection_mixer = HyperConnection(e, inject=False)

    def make_caches(self) -> list:
        return [layer.make_cache() for layer in self.layers]

    def _streams(self, hidden: mx.array) -> mx.array:
        H, W = self.e.hidden, self.e.hc * self.e.hidden
        return hidden[..., H:] if hidden.shape[-1] == H + W else hidden[..., :W]

    def __call__(self, hidden: mx.array, next_embed: mx.array, caches: list) -> mx.array:
        return self.ragged(hidden, next_embed, [(caches, hidden.shape[1])])

    def ragged(self, hidden: mx.array, next_embed: mx.array, sequences: Sequence[tuple[list, int]]) -> mx.array:
        """hidden: the target's rows (or this head's last output) -> [mixer output | streams]."""
        e = self.e
        h = self._streams(hidden)
        emb = self.fc_embedding(self.pre_fc_norm_embedding(next_embed[..., :e.hidden]))
        streams = self.fc_hidden(self.pre_fc_norm_hidden(h).reshape(*h.shape[:-1], e.hc, e.hidden))
        z = (emb[..., None, :] + streams).reshape(h.shape)
        for i, layer in enumerate(self.layers):
            z = layer.ragged(z, None, [Segment(c[i], rows) for c, rows in sequences])
        return mx.concatenate([self.hyper_connection_mixer(z)[0], z], axis=-1)
