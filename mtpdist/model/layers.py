"""Qwen3.5 decoder layers: mlx-lm's attention/MLP/MoE blocks, our rollback-aware GDN.

The GatedDeltaNet here is mlx-lm's module with its forward replaced (by subclassing) so
that one pass over T tokens can leave snapshots of its state after chosen positions.
The recurrence is split at those positions; each segment continues from the previous
segment's state, so the arithmetic is the same as one unsplit pass.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk
from mlx_lm.models.qwen3_5 import GatedDeltaNet, TextModelArgs
from mlx_lm.models.qwen3_next import Qwen3NextAttention as Attention
from mlx_lm.models.qwen3_next import Qwen3NextMLP as MLP
from mlx_lm.models.qwen3_next import Qwen3NextSparseMoeBlock as SparseMoeBlock

from .cache import AttentionCache, GDNCache


SMALL_T = 4  # passes this short (decode, verify) take the compiled path


@mx.compile
def _recurrence(q, k, v, a, b, A_log, dt_bias, state):
    """The gated delta rule over a few tokens as one compiled graph.

    Same arithmetic as mlx-lm's ops path (compute_g, then the per-step update); returns
    y [B, T, Hv, Dv] followed by the state after each position.
    """
    beta = mx.sigmoid(b)
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))
    rep = v.shape[-2] // q.shape[-2]
    if rep > 1:
        q, k = mx.repeat(q, rep, -2), mx.repeat(k, rep, -2)
    ys, states = [], []
    for t in range(q.shape[1]):
        state = state * g[:, t, :, None, None]
        kv_mem = (state * k[:, t, :, None, :]).sum(axis=-1)
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = state + k[:, t, :, None, :] * delta[..., None]
        ys.append((state * q[:, t, :, None, :]).sum(axis=-1).astype(q.dtype))
        states.append(state)
    return (mx.stack(ys, axis=1), *states)


class RollbackGatedDeltaNet(GatedDeltaNet):
    """GatedDeltaNet whose forward can snapshot its state after given positions."""

    def __call__(self, x: mx.array, cache: GDNCache | None, keep: Sequence[int] = ()) -> mx.array:
        B, T, _ = x.shape
        K = self.conv_kernel_size
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        b = self.in_proj_b(x)
        a = self.in_proj_a(x)

        conv_state = cache.conv if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((B, K - 1, self.conv_dim), dtype=x.dtype)
        conv_input = mx.concatenate([conv_state, qkv], axis=1)
        conv_out = nn.silu(self.conv1d(conv_input))
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)

        state = cache.ssm if cache is not None else None  # no cache: a whole sequence (training)
        cuts = [p for p in keep if 0 < p < T]
        snapshots = {}
        if T <= SMALL_T and not mx.metal.is_available():
            # Decode and verify: every step fused in one compiled graph, states after each kept.
            if state is None:
                state = mx.zeros((B, self.num_v_heads, self.head_v_dim, self.head_k_dim), dtype=mx.float32)
            out, *states = _recurrence(q, k, v, a, b, self.A_log, self.dt_bias, state)
            state = states[-1]
            snapshots = {p: (conv_input[:, p : p + K - 1], states[p - 1]) for p in cuts}
        elif not cuts:
            out, state = gated_delta_update(q, k, v, a, b, self.A_log, self.dt_bias, state, None,
                                            use_kernel=not self.training)
        else:  # split the recurrence where snapshots are wanted (Metal kernel, or long chunks)
            bounds, outs = [0, *cuts, T], []
            for s, e in zip(bounds[:-1], bounds[1:]):
                y, state = gated_delta_update(q[:, s:e], k[:, s:e], v[:, s:e], a[:, s:e], b[:, s:e],
                                              self.A_log, self.dt_bias, state, None, use_kernel=not self.training)
                outs.append(y)
                if e < T:
                    snapshots[e] = (conv_input[:, e : e + K - 1], state)
            out = mx.concatenate(outs, axis=1)
        if cache is not None:
            cache.record(mx.contiguous(conv_input[:, -(K - 1):]), state, T, snapshots)

        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """One Qwen3.5 decoder layer: GDN or gated full attention, then a dense MLP or MoE."""

    def __init__(self, args: TextModelArgs, linear: bool):
        super().__init__()
        self.is_linear = linear
        if linear:
            self.linear_attn = RollbackGatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.num_experts > 0:
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array, cache, keep: Sequence[int] = ()) -> mx.array:
        h = self.input_layernorm(x)
        if self.is_linear:
            r = self.linear_attn(h, cache, keep)
        else:
            r = self.self_attn(h, create_attention_mask(h, cache), cache)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h))


def make_cache(layer: DecoderLayer):
    """A fresh per-sequence cache for one layer."""
    return GDNCache() if layer.is_linear else AttentionCache()
