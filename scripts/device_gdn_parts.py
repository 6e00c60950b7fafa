#!/usr/bin/env python3
"""Cost of each part of one GatedDeltaNet layer at 1 vs 2 tokens (any MLX backend; 0.8B shapes, bf16)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mtpdist.bench import timed as _bench_timed  # noqa: E402


def timed(fn, n=100):
    return _bench_timed(fn, n, warmup=5)
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mtpdist.model.config import ModelConfig  # noqa: E402
from mtpdist.model.layers import DecoderLayer, _recurrence  # noqa: E402
from mtpdist.model.synthetic import make_config  # noqa: E402



cfg = ModelConfig.from_dict(make_config(sys.argv[1] if len(sys.argv) > 1 else "0.8b"))
layer = DecoderLayer(cfg.text_args(), True)
layer.update(tree_map(lambda v: v if v.ndim == 1 else v.astype(mx.bfloat16), layer.parameters()))
mx.eval(layer.parameters())
g = layer.linear_attn
H = cfg.hidden_size
out = {"device": str(mx.default_device())}
state = mx.zeros((1, g.num_v_heads, g.head_v_dim, g.head_k_dim))
for T in (1, 2):
    x = mx.random.normal((1, T, H)).astype(mx.bfloat16)
    conv_in = mx.random.normal((1, T + 3, g.conv_dim)).astype(mx.bfloat16)
    q = mx.random.normal((1, T, g.num_k_heads, g.head_k_dim)).astype(mx.bfloat16)
    v = mx.random.normal((1, T, g.num_v_heads, g.head_v_dim)).astype(mx.bfloat16)
    ab = mx.random.normal((1, T, g.num_v_heads)).astype(mx.bfloat16)
    o = mx.random.normal((1, T, g.value_dim)).astype(mx.bfloat16)
    mx.eval(x, conv_in, q, v, ab, o)
    parts = {
        "in_proj_x4": lambda: mx.eval(g.in_proj_qkv(x), g.in_proj_z(x), g.in_proj_b(x), g.in_proj_a(x)),
        "conv1d": lambda: mx.eval(nn.silu(g.conv1d(conv_in))),
        "recurrence": lambda: mx.eval(_recurrence(q, q, v, ab, ab, g.A_log, g.dt_bias, state)),
        "out_proj": lambda: mx.eval(g.out_proj(o)),
        "mlp": lambda: mx.eval(layer.mlp(x)),
        "norms": lambda: mx.eval(layer.input_layernorm(x), g.norm(v, v)),
    }
    for name, fn in parts.items():
        out[f"{name}_T{T}"] = round(timed(fn), 4)
for name in ("in_proj_x4", "conv1d", "recurrence", "out_proj", "mlp", "norms"):
    out[f"{name}_ratio"] = round(out[f"{name}_T2"] / out[f"{name}_T1"], 3)
print(json.dumps(out, indent=1))
