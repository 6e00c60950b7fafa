#!/usr/bin/env python3
"""Where a 2-token verify pass spends its time vs a 1-token step, per layer kind (any MLX backend).

usage: scripts/device_layer_costs.py [SIZE]   (default 0.8b: Qwen3.5-0.8B shapes, random bf16 weights)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mtpdist.bench import timed as _bench_timed  # noqa: E402


def timed(fn, n=50):
    return _bench_timed(fn, n, warmup=5)
from mlx.utils import tree_map  # noqa: E402

from mtpdist.model.config import ModelConfig  # noqa: E402
from mtpdist.model.layers import DecoderLayer, make_cache  # noqa: E402
from mtpdist.model.qwen35 import Head  # noqa: E402
from mtpdist.model.synthetic import make_config  # noqa: E402



def main(size="0.8b"):
    cfg = ModelConfig.from_dict(make_config(size))
    args = cfg.text_args()
    H = cfg.hidden_size
    out = {"device": str(mx.default_device()), "size": size}
    head = Head(cfg)
    head.update(tree_map(lambda v: v.astype(mx.bfloat16), head.parameters()))
    mx.eval(head.parameters())
    for T in (1, 2):
        x = mx.random.normal((1, T, H)).astype(mx.bfloat16)
        mx.eval(x)
        out[f"lm_head_T{T}_ms"] = timed(lambda: mx.eval(head.logits(x)))
    for kind, linear in (("gdn", True), ("attention", False)):
        layer = DecoderLayer(args, linear)
        layer.update(tree_map(lambda v: v if v.dtype == mx.float32 and v.ndim == 1 else v.astype(mx.bfloat16),
                              layer.parameters()))
        mx.eval(layer.parameters())
        cache = make_cache(layer)
        mx.eval(layer(mx.random.normal((1, 64, H)).astype(mx.bfloat16), cache))
        for T, keep in ((1, ()), (2, (1,))):
            x = mx.random.normal((1, T, H)).astype(mx.bfloat16)
            mx.eval(x)

            def run():
                y = layer(x, cache, keep)
                mx.eval(y, *(a for a in getattr(cache, "state", ()) if isinstance(a, mx.array)))
                if keep:
                    cache.rewind(1)
                else:
                    cache.rewind(0) if linear else cache.trim(1)
            out[f"{kind}_T{T}_ms"] = timed(run)
    for k in ("lm_head", "gdn", "attention"):
        out[f"{k}_ratio"] = round(out[f"{k}_T2_ms"] / out[f"{k}_T1_ms"], 3)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
