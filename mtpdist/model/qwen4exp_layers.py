"""qwen4_exp (Qwen3.8-Flash-Next) decoder layers, built on the Qwen3.5 pieces they share.

What differs from Qwen3.5 (see the public transformers / mlx-vlm `qwen4_exp` sources):
- Hyper-connections instead of pre-norms: the residual is `hc` streams of width H side by
  side ([..., hc*H]); before each block a `HyperConnection` norms each stream, mixes them into
  the block's input with learned sigmoid weights and returns per-stream inject weights; the
  block's output is added to every stream scaled by its weight.
- Full-attention layers carry a sparse-attention indexer: per query, the top blocks of
  `indexer_compress_ratio` tokens by a ReLU dot score against mean-pooled block keys, plus the
  incomplete tail block; exactly dense while a query sees at most `indexer_budget` tokens'
  worth of complete blocks.
- The GatedDeltaNet output norm is gated by a sigmoid (`output_gate_type`).
- An n-gram embedding (PLE) on some GDN layers, fed the token ids (hashed bigrams/trigrams).
- All RMSNorms but the GDN's are (1 + w) in the checkpoint; the loader folds the 1 in, as for Qwen3.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .layers import RaggedAttention, RollbackGatedDeltaNet, Segment
from .qwen4exp_cache import IndexedKVCache


@dataclass(frozen=True)
class Qwen4Extras:
    """The config fields qwen4_exp adds to Qwen3.5-MoE's."""
    hidden: int
    hc: int
    hc_rank: int
    eps: float
    ple_layers: tuple[int, ...]      # 0-based layer indices with an n-gram embedding
    ple_dim: int
    ple_kernel: int
    ngram: int
    heads_per_ngram: int
    ngram_base: int
    ngram_divisor: int
    seed: int
    vocab: int
    eos: int
    idx_heads: int
    idx_dim: int
    idx_budget: int
    idx_ratio: int
    gate_act: str
    rotary_dims: int
    rope_theta: float

    @classmethod
    def from_text(cls, t: dict) -> "Qwen4Extras":
        eos = t.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        rope = t.get("rope_parameters") or {}
        H = int(t["hidden_size"])
        return cls(hidden=H, hc=int(t.get("hc_count", 4)), hc_rank=int(t.get("hc_lowrank", 320)),
                   eps=float(t.get("rms_norm_eps", 1e-6)),
                   ple_layers=tuple(sorted(i - 1 for i in set(t.get("ple_layer_ids") or []))),
                   ple_dim=int(t.get("ple_embed_dim") or H), ple_kernel=int(t.get("ple_conv_kernel_size", 4)),
                   ngram=int(t.get("ngram_size", 3)), heads_per_ngram=int(t.get("heads_per_ngram", 8)),
                   ngram_base=int(t.get("ngram_vocab_size_base", 20_000_000)),
                   ngram_divisor=int(t.get("make_ngram_vocab_size_divisible_by", 128)),
                   seed=int(t.get("seed", 1234)), vocab=int(t["vocab_size"]), eos=int(eos if eos is not None else 0),
                   idx_heads=int(t.get("indexer_n_heads") or 4), idx_dim=int(t.get("indexer_head_dim") or 128),
                   idx_budget=int(t.get("indexer_budget") or 2048), idx_ratio=int(t.get("indexer_compress_ratio") or 4),
                   gate_act=str(t.get("output_gate_type") or t.get("hidden_act") or "silu"),
                   rotary_dims=int(int(t.get("head_dim") or H // int(t["num_attention_heads"]))
                                   * float(rope.get("partial_rotary_factor", 0.25))),
                   rope_theta=float(rope.get("rope_theta", 10_000_000.0)))


class GroupedRMSNorm(nn.Module):
    """RMSNorm over groups of `group` features (each stream alone), weight over all of them."""

    def __init__(self, dims: int, group: int | None, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.group, self.eps = group, eps

    def __call__(self, x: mx.array) -> mx.array:
        if self.group is None or self.group == x.shape[-1]:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        y = mx.fast.rms_norm(x.reshape(*x.shape[:-1], -1, self.group), None, self.eps)
        return y.reshape(x.shape) * self.weight


class HyperConnection(nn.Module):
    """Reads a block's input from the streams (and, with `inject`, how much to add back to each)."""

    def __init__(self, e: Qwen4Extras, inject: bool = True):
        super().__init__()
        W = e.hc * e.hidden
        self.n, self.H = e.hc, e.hidden
        self.hc_norm = GroupedRMSNorm(W, e.hidden, e.eps)
        self.input_mix_weight_down = nn.Linear(W, e.hc_rank, bias=False)
        self.input_mix_weight_up = nn.Linear(e.hc_rank, W, bias=False)
        if inject:
            self.block_inject_weight = nn.Linear(W, e.hc, bias=False)

    def __call__(self, h: mx.array) -> tuple[mx.array, mx.array | None]:
        """h [..., n*H] -> (block input [..., H], inject weights [..., n] or None)."""
        normed = self.hc_norm(h)
        w = mx.sigmoid(self.input_mix_weight_up(nn.silu(self.input_mix_weight_down(normed) / self.n)))
        mixed = (w * normed).reshape(*h.shape[:-1], self.n, self.H).mean(axis=-2)
        if "block_inject_weight" not in self:
            return mixed, None
        return mixed, 2 * mx.sigmoid(self.block_inject_weight(normed) / self.n)


def add_block(h: mx.array, out: mx.array, inject: mx.array) -> mx.array:
    """Streams + the block's output [..., H] scaled per stream by `inject` [..., n]."""
    return h + (out[..., None, :] * inject[..., :, None]).reshape(h.shape)


def rope_at(x: mx.array, positions: mx.array, dims: int, base: float) -> mx.array:
    """Rotate the first `dims` features of x [..., P, D] (rotate-half layout) by positions [P]."""
    half = dims // 2
    inv = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    ang = positions.astype(mx.float32)[:, None] * inv[None]
    cos, sin = mx.cos(ang).astype(x.dtype), mx.sin(ang).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:dims]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., dims:]], axis=-1)


class SigmoidGatedNorm(nn.Module):
    """The GDN output norm: RMSNorm (plain weight) times act(gate), act sigmoid or silu."""

    def __init__(self, dims: int, eps: float, act: str):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps, self.act = eps, act

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x, self.weight, self.eps).astype(mx.float32)
        g = gate.astype(mx.float32)
        return (y * (mx.sigmoid(g) if self.act == "sigmoid" else nn.silu(g))).astype(x.dtype)


class Qwen4GatedDeltaNet(RollbackGatedDeltaNet):
    """Qwen3.5's rollback-aware GDN with qwen4_exp's gated output norm."""

    def __init__(self, args, e: Qwen4Extras):
        super().__init__(args)
        self.norm = SigmoidGatedNorm(self.head_v_dim, args.rms_norm_eps, e.gate_act)


class Indexer(nn.Module):
    """Chooses which past tokens each query attends to (see the module docstring)."""

    def __init__(self, e: Qwen4Extras):
        super().__init__()
        self.e = e
        self.index_qk_proj = nn.Linear(e.hidden, (e.idx_heads + 1) * e.idx_dim, bias=False)
        self.q_layernorm = GroupedRMSNorm(e.idx_dim, None, e.eps)
        self.k_layernorm = GroupedRMSNorm(e.idx_dim, None, e.eps)

    def mask(self, qk: mx.array, cache: IndexedKVCache, start: int) -> mx.array | None:
        """qk [T, (heads+1)*d] of one sequence whose pass starts at `start` -> bool mask [T, S]
        (None before the first block completes: plain causal attention)."""
        e, T = self.e, qk.shape[0]
        q = qk[:, :e.idx_heads * e.idx_dim].reshape(T, e.idx_heads, e.idx_dim)
        cache.append_index_keys(qk[:, e.idx_heads * e.idx_dim:], start)
        S, r = start + T, e.idx_ratio
        blocks = S // r
        if blocks == 0:
            return None
        pos = mx.arange(start, S)
        q = rope_at(self.q_layernorm(q).swapaxes(0, 1), pos, e.rotary_dims, e.rope_theta)      # [h, T, d]

        def finish(pooled, ids):
            return rope_at(self.k_layernorm(pooled), ids * r, e.rotary_dims, e.rope_theta)
        keys = cache.pooled_keys(blocks, r, finish)                                             # [B, d]
        scores = mx.maximum(q.astype(mx.float32) @ keys.astype(mx.float32).T, 0).sum(axis=0) / math.sqrt(e.idx_dim)
        seen = (pos + 1) // r                                                                   # complete blocks per query
        valid = mx.arange(blocks)[None] < seen[:, None]
        scores = mx.where(valid, scores, -mx.inf)
        k = e.idx_budget // r
        if blocks > k:
            # Exactly k blocks per query (a threshold would take every block tied with the k-th,
            # and ReLU scores tie at 0); rows that see k or fewer blocks keep all of theirs.
            top = mx.argpartition(-scores, k - 1, axis=-1)[:, :k]
            chosen = mx.put_along_axis(mx.zeros((T, blocks), dtype=mx.bool_), top, mx.array(True), axis=-1)
            chosen = valid & (chosen | (seen[:, None] <= k))
        else:
            chosen = scores >= 0   # = valid (scores are >= 0), keeps the pooled keys in the graph
        tokens = mx.repeat(chosen, r, axis=1)
        j = mx.arange(S)[None]
        tail = (j >= (seen * r)[:, None]) & (j <= pos[:, None])
        if S > blocks * r:
            tokens = mx.concatenate([tokens, mx.zeros((T, S - blocks * r), dtype=mx.bool_)], axis=1)
        return tokens | tail


class IndexedAttention(RaggedAttention):
    """Qwen3.5's gated attention, each query restricted to the indexer's choice of keys."""

    def __init__(self, args, e: Qwen4Extras):
        super().__init__(args)
        self.indexer = Indexer(e)

    def ragged(self, x: mx.array, segments: Sequence[Segment]) -> mx.array:
        queries, gate, keys, values = self.project(x)
        qk = self.indexer.index_qk_proj(x)[0]
        outs, s = [], 0
        for seg in segments:
            e, cache = s + seg.rows, seg.cache
            start = cache.offset
            mask = self.indexer.mask(qk[s:e], cache, start)
            q = self.rope(queries[:, s:e].transpose(0, 2, 1, 3), offset=start)
            k = self.rope(keys[:, s:e].transpose(0, 2, 1, 3), offset=start)
            k, v = cache.update_and_fetch(k, values[:, s:e].transpose(0, 2, 1, 3))
            if mask is None:
                mask = create_attention_mask(x[:, s:e], cache)
            o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
            outs.append(o.transpose(0, 2, 1, 3).reshape(1, seg.rows, -1))
            s = e
        output = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        return self.o_proj(output * mx.sigmoid(gate))
