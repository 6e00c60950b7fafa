#!/usr/bin/env python3
"""Experiment (CUDA only): the small-T gated delta rule as one custom kernel vs the compiled graph.

Result on an H100 (BENCHMARKS.md): equal values (states within 6e-8), 0.187 vs 0.248 ms at
2 tokens. Not used by the model: the projections, not the recurrence, dominate the 2-token
cost there. Kept as the starting point for a Metal/CUDA small-T kernel.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mtpdist.bench import timed as _bench_timed  # noqa: E402
from mtpdist.model.layers import _recurrence  # noqa: E402


def timed(fn, n=100):
    return _bench_timed(fn, n, warmup=5)


_SOURCE = """
    auto idx = cooperative_groups::this_grid().thread_rank();
    if (idx >= B * Hv * Dv) return;
    int dv = idx % Dv;
    int bh = idx / Dv;
    int hv = bh % Hv;
    int b = bh / Hv;
    int hk = hv / (Hv / Hk);
    float s[Dk];
    const float* st = state + ((size_t)(b * Hv + hv) * Dv + dv) * Dk;
    for (int i = 0; i < Dk; ++i) s[i] = st[i];
    for (int t = 0; t < T; ++t) {
        int bt = b * T + t;
        float gt = g[bt * Hv + hv];
        float be = beta[bt * Hv + hv];
        const InT* kt = k + ((size_t)bt * Hk + hk) * Dk;
        const InT* qt = q + ((size_t)bt * Hk + hk) * Dk;
        float vt = static_cast<float>(v[((size_t)bt * Hv + hv) * Dv + dv]);
        float kv = 0.0f;
        for (int i = 0; i < Dk; ++i) {
            s[i] = s[i] * gt;
            kv += s[i] * static_cast<float>(kt[i]);
        }
        float delta = (vt - kv) * be;
        float out = 0.0f;
        for (int i = 0; i < Dk; ++i) {
            s[i] = s[i] + static_cast<float>(kt[i]) * delta;
            out += s[i] * static_cast<float>(qt[i]);
        }
        y[((size_t)bt * Hv + hv) * Dv + dv] = static_cast<InT>(out);
        float* so = states + ((((size_t)t * B + b) * Hv + hv) * Dv + dv) * Dk;
        for (int i = 0; i < Dk; ++i) so[i] = s[i];
    }
"""
_kernel = None


def _available() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


@mx.compile
def _gates(a, b, A_log, dt_bias):
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * mx.logaddexp(a + dt_bias, 0))  # softplus
    return g.astype(mx.float32), mx.sigmoid(b).astype(mx.float32)


def kernel_recurrence(q, k, v, a, b, A_log, dt_bias, state):
    """Same contract as layers._recurrence: (y, state after each of the T positions...)."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="mtpdist_gdn_small_t", input_names=["q", "k", "v", "g", "beta", "state"],
                                      output_names=["y", "states"], source=_SOURCE)
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    g, beta = _gates(a, b, A_log, dt_bias)
    y, states = _kernel(
        inputs=[q, k, v, g, beta, state.astype(mx.float32)],
        template=[("InT", q.dtype), ("B", B), ("T", T), ("Hk", Hk), ("Hv", Hv), ("Dk", Dk), ("Dv", Dv)],
        grid=(B * Hv * Dv, 1, 1), threadgroup=(128, 1, 1),
        output_shapes=[(B, T, Hv, Dv), (T, B, Hv, Dv, Dk)], output_dtypes=[q.dtype, mx.float32])
    return (y, *[states[t] for t in range(T)])


out = {"cuda": mx.cuda.is_available()}
B, Hk, Hv, Dk, Dv = 1, 16, 16, 128, 128
mx.random.seed(0)
A_log = mx.log(mx.random.uniform(1, 16, (Hv,)))
dt_bias = mx.ones((Hv,))
state = mx.random.normal((B, Hv, Dv, Dk)) * 0.1
for T in (1, 2, 3):
    q = (mx.random.normal((B, T, Hk, Dk)) * 0.1).astype(mx.bfloat16)
    k = (mx.random.normal((B, T, Hk, Dk)) * 0.1).astype(mx.bfloat16)
    v = mx.random.normal((B, T, Hv, Dv)).astype(mx.bfloat16)
    a = mx.random.normal((B, T, Hv)).astype(mx.bfloat16)
    b = mx.random.normal((B, T, Hv)).astype(mx.bfloat16)
    ref = _recurrence(q, k, v, a, b, A_log, dt_bias, state)
    got = kernel_recurrence(q, k, v, a, b, A_log, dt_bias, state)
    mx.eval(ref, got)
    out[f"T{T}_max_abs_diff_y"] = float(mx.abs(ref[0].astype(mx.float32) - got[0].astype(mx.float32)).max())
    out[f"T{T}_max_abs_diff_states"] = max(float(mx.abs(r - g).max()) for r, g in zip(ref[1:], got[1:]))
    out[f"T{T}_compiled_ms"] = timed(lambda: mx.eval(_recurrence(q, k, v, a, b, A_log, dt_bias, state)))
    out[f"T{T}_kernel_ms"] = timed(lambda: mx.eval(kernel_recurrence(q, k, v, a, b, A_log, dt_bias, state)))
print(json.dumps(out, indent=1))
