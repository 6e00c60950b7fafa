"""Qwen3.5 decoder layers: mlx-lm's attention/MLP/MoE blocks, our rollback-aware GDN.

The GatedDeltaNet here is mlx-lm's module with its forward replaced (by subclassing) so
that one pass over T tokens can leave snapshots of its state after chosen positions.
The recurrence is split at those positions; each segment continues from the previous
segment's state, so the arithmetic is the same as one unsplit pass.

`ragged` runs several sequences' rows as one forward: projections and MLPs over all rows
at once (one read of each weight), attention and the recurrence per sequence on its own
cache. Matmul rows do not interact, so a sequence's output in a batch equals its output
alone; the single-sequence path is the same code with one segment.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk
from mlx_lm.models.qwen3_5 import GatedDeltaNet, TextModelArgs
from mlx_lm.models.qwen3_next import Qwen3NextAttention as Attention
from mlx_lm.models.qwen3_next import Qwen3NextMLP as MLP
from mlx_lm.models.qwen3_next import Qwen3NextSparseMoeBlock as SparseMoeBlock

from . import rowstable
from .cache import AttentionCache, GDNCache


SMALL_T = 9  # passes this short (decode, depth-k verify up to k=8) take the compiled path


class Segment(NamedTuple):
    """One sequence's rows in a ragged forward: its cache for this layer, row count, snapshots."""
    cache: object
    rows: int
    keep: tuple[int, ...] = ()


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

    def _project(self, x: mx.array):
        B, T, _ = x.shape
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def _output(self, out: mx.array, z: mx.array) -> mx.array:
        B, T = out.shape[:2]
        return self.out_proj(self.norm(out, z).reshape(B, T, -1))

    def __call__(self, x: mx.array, cache: GDNCache | None, keep: Sequence[int] = ()) -> mx.array:
        qkv, z, b, a = self._project(x)
        return self._output(self._mix(qkv, b, a, cache, keep), z)

    def ragged(self, x: mx.array, segments: Sequence[Segment]) -> mx.array:
        """x [1, N, H] holding several sequences' rows back to back."""
        qkv, z, b, a = self._project(x)
        n = sum(seg.rows for seg in segments)
        if n < x.shape[1]:  # zero rows padding the pass (see rowstable): no sequence's
            qkv, b, a = qkv[:, :n], b[:, :n], a[:, :n]
        if _stackable(segments):
            out = self._mix_stacked(qkv, b, a, segments)
        else:
            outs, s = [], 0
            for seg in segments:
                e = s + seg.rows
                outs.append(self._mix(qkv[:, s:e], b[:, s:e], a[:, s:e], seg.cache, seg.keep))
                s = e
            out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        return self._output(rowstable.fill_rows(out, x.shape[1]), z)

    def _mix(self, qkv: mx.array, b: mx.array, a: mx.array, cache: GDNCache | None,
             keep: Sequence[int]) -> mx.array:
        """Conv and gated delta recurrence of one sequence -> y [1, T, Hv, Dv]; updates its cache."""
        conv = cache.conv if cache is not None else None
        ssm = cache.ssm if cache is not None else None  # no cache: a whole sequence (training)
        out, conv_input, state, snapshots = self._mix_states(qkv, b, a, conv, ssm, keep)
        if cache is not None:
            K = self.conv_kernel_size
            cache.record(mx.contiguous(conv_input[:, -(K - 1):]), state, qkv.shape[1], snapshots)
        return out

    def _mix_stacked(self, qkv: mx.array, b: mx.array, a: mx.array, segments: Sequence[Segment]) -> mx.array:
        """Same-length sequences as one batch: their states stacked, one conv and one recurrence,
        then each cache gets its own row back (rows do not interact, so each equals its solo run)."""
        B, T, K = len(segments), segments[0].rows, self.conv_kernel_size
        caches = [seg.cache for seg in segments]
        out, conv_input, state, snapshots = self._mix_states(
            qkv.reshape(B, T, -1), b.reshape(B, T, -1), a.reshape(B, T, -1),
            mx.concatenate([c.conv for c in caches], axis=0), mx.concatenate([c.ssm for c in caches], axis=0),
            segments[0].keep)
        for i, c in enumerate(caches):
            c.record(mx.contiguous(conv_input[i:i + 1, -(K - 1):]), state[i:i + 1], T,
                     {p: (cv[i:i + 1], st[i:i + 1]) for p, (cv, st) in snapshots.items()})
        return out.reshape(1, B * T, *out.shape[2:])

    def _mix_states(self, qkv, b, a, conv_state, state, keep):
        """The conv and recurrence over [B, T, ...] from given states: (y, conv input, final state,
        {position: (conv window, state)} snapshots)."""
        B, T, _ = qkv.shape
        K = self.conv_kernel_size
        if conv_state is None:
            conv_state = mx.zeros((B, K - 1, self.conv_dim), dtype=qkv.dtype)
        conv_input = mx.concatenate([conv_state, qkv], axis=1)
        conv_out = nn.silu(self.conv1d(conv_input))
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)

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
        return out, conv_input, state, snapshots


def _stackable(segments: Sequence[Segment]) -> bool:
    """Several sequences with the same row count and snapshot positions, each with state already:
    their recurrences can run as one batch (every decode step, verify passes of one depth)."""
    if len(segments) < 2:
        return False
    first = segments[0]
    return all(s.rows == first.rows and tuple(s.keep) == tuple(first.keep) and s.cache is not None
               and s.cache.ssm is not None for s in segments)


class RaggedAttention(Attention):
    """mlx-lm's gated attention, run over several sequences' rows with one projection each."""

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """Queries (q-normed), the output gate, keys (k-normed) and values of rows x [1, N, H]."""
        _, N, _ = x.shape
        queries, gate = mx.split(self.q_proj(x).reshape(1, N, self.num_attention_heads, -1), 2, axis=-1)
        keys = self.k_norm(self.k_proj(x).reshape(1, N, self.num_key_value_heads, -1))
        values = self.v_proj(x).reshape(1, N, self.num_key_value_heads, -1)
        return self.q_norm(queries), gate.reshape(1, N, -1), keys, values

    def ragged(self, x: mx.array, segments: Sequence[Segment]) -> mx.array:
        queries, gate, keys, values = self.project(x)
        outs, s = [], 0
        for seg in segments:
            e, cache = s + seg.rows, seg.cache
            q = self.rope(queries[:, s:e].transpose(0, 2, 1, 3), offset=cache.offset)
            k = self.rope(keys[:, s:e].transpose(0, 2, 1, 3), offset=cache.offset)
            k, v = cache.update_and_fetch(k, values[:, s:e].transpose(0, 2, 1, 3))
            if 1 < seg.rows <= SMALL_T and rowstable.enabled():
                o = self._rowwise(q, k, v, cache)
            else:
                mask = create_attention_mask(x[:, s:e], cache)
                o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
            outs.append(o.transpose(0, 2, 1, 3).reshape(1, seg.rows, -1))
            s = e
        output = rowstable.fill_rows(outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1), x.shape[1])
        return self.o_proj(output * mx.sigmoid(gate))

    def _rowwise(self, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
        """Causal attention of T queries as T one-query calls over growing key prefixes:
        each row then takes the kernel (and gets the bits) a one-token step would."""
        T, L = q.shape[2], k.shape[2]
        outs = [scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, :L - T + i + 1], v[:, :, :L - T + i + 1],
                                             cache=cache, scale=self.scale, mask=None) for i in range(T)]
        return mx.concatenate(outs, axis=2)


class DecoderLayer(nn.Module):
    """One Qwen3.5 decoder layer: GDN or gated full attention, then a dense MLP or MoE."""

    def __init__(self, args: TextModelArgs, linear: bool):
        super().__init__()
        self.is_linear = linear
        if linear:
            self.linear_attn = RollbackGatedDeltaNet(args)
        else:
            self.self_attn = RaggedAttention(args)
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


    def ragged(self, x: mx.array, segments: Sequence[Segment]) -> mx.array:
        """Several sequences' rows [1, N, H] through this layer, each on its own cache."""
        h = self.input_layernorm(x)
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer.ragged(h, segments)
        return h + self.mlp(self.post_attention_layernorm(h))


def make_cache(layer: DecoderLayer):
    """A fresh per-sequence cache for one layer."""
    return GDNCache() if layer.is_linear else AttentionCache()
