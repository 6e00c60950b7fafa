#!/usr/bin/env python3
"""Per-layer costs of Qwen3.8-Flash-Next (qwen4_exp) at its real widths, random 4-bit weights.

Times one GDN layer, the GDN layer carrying the n-gram embedding (PLE), and one indexed-attention
layer (at a context below and above the indexer's budget), each for a pass of T = 1..4 rows (a
decode step and depth 1-3 verify passes), plus the coordinator's head (mixer + lm_head) and the
MTP head at T = 1. Then a whole-model estimate: 36 GDN + 12 attention layers + the PLE extra.
The n-gram table has fewer rows than the release's 320M (a lookup reads 16 rows whatever the
table's size) so that it fits beside the rest.

usage: scripts/device_qwen4exp_costs.py [--shrink]   (--shrink: tiny widths, a CPU smoke test)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mtpdist.model.config import ModelConfig  # noqa: E402
from mtpdist.model.convert import ConvertOptions, quant_rule  # noqa: E402
from mtpdist.model.layers import Segment  # noqa: E402
from mtpdist.model.qwen4exp import Head, LayerStack, MTPHead  # noqa: E402


def text_config(shrink: bool) -> dict:
    """Flash-Next's shapes, 3 layers: GDN, GDN + PLE, indexed attention."""
    t = dict(model_type="qwen4_exp_text", vocab_size=248320, hidden_size=2560, num_hidden_layers=3,
             layer_types=["linear_attention", "linear_attention", "full_attention"],
             num_attention_heads=24, num_key_value_heads=2, head_dim=256, linear_conv_kernel_dim=4,
             linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
             moe_intermediate_size=640, shared_expert_intermediate_size=640, num_experts=512, num_experts_per_tok=10,
             hc_count=4, hc_lowrank=320, ple_layer_ids=[2], ple_embed_dim=2560, ple_conv_kernel_size=4, ngram_size=3,
             heads_per_ngram=8, ngram_vocab_size_base=65536, make_ngram_vocab_size_divisible_by=128,
             indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=128, indexer_budget=2048,
             indexer_compress_ratio=4, output_gate_type="sigmoid", rms_norm_eps=1e-6, eos_token_id=1,
             tie_word_embeddings=False, mtp_num_hidden_layers=1,
             rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25})
    if shrink:
        t.update(vocab_size=1024, hidden_size=64, num_attention_heads=4, head_dim=32, linear_key_head_dim=16,
                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=4, hc_lowrank=32,
                 ple_embed_dim=64, heads_per_ngram=2, ngram_vocab_size_base=1000, indexer_n_heads=2,
                 indexer_head_dim=16, indexer_budget=64)
    return t


def prepare(module: nn.Module) -> None:
    """bf16, then 4-bit as `convert -q` would (8-bit routers/gates/inject, group 32 where needed)."""
    module.update(tree_map(lambda v: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v, module.parameters()))
    opts = ConvertOptions(quantize=True)
    nn.quantize(module, group_size=64, bits=4, class_predicate=lambda p, m: quant_rule(p, m, opts))
    mx.eval(module.parameters())


def timed(fn, n: int) -> float:
    """ms per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def layer_costs(stack: LayerStack, i: int, context: int, width: int, n: int) -> dict:
    """ms per pass of T rows after `context` tokens (GDN state is restored by copy, KV by rewind)."""
    layer, base = stack.layers[i], stack.layers[i].make_cache()
    toks = np.random.default_rng(0).integers(2, 1000, context + 8)
    h = (0.1 * mx.random.normal((1, context, width))).astype(mx.bfloat16)
    for s in range(0, context, 512):          # prefill in chunks
        e = min(context, s + 512)
        mx.eval(layer.ragged(h[:, s:e], toks[s:e], [Segment(base, e - s)]))
    out = {}
    for T in (1, 2, 3, 4):
        x = (0.1 * mx.random.normal((1, T, width))).astype(mx.bfloat16)
        mx.eval(x)
        total = 0.0
        for it in range(3 + n):
            c = base.copy() if layer.is_linear else base
            t0 = time.perf_counter()
            mx.eval(layer.ragged(x, toks[context:context + T], [Segment(c, T, tuple(range(1, T)))]))
            if it >= 3:
                total += time.perf_counter() - t0
            if not layer.is_linear:
                base.rewind(T)
        out[f"T{T}_ms"] = round(total / n * 1e3, 3)
    return out


def main(shrink: bool = False) -> None:
    t = text_config(shrink)
    cfg = ModelConfig.from_dict(t)
    mx.random.seed(0)
    stack = LayerStack(cfg, 0, 3)
    prepare(stack)
    W = 4 * t["hidden_size"]
    n = 5 if shrink else 20
    res = {"device": str(mx.default_device()), "shrink": shrink}
    res["gdn"] = layer_costs(stack, 0, 1024, W, n)
    res["gdn_ple"] = layer_costs(stack, 1, 1024, W, n)
    small, big = (64, 512) if shrink else (2048, 8192)
    res[f"attn_ctx{small}"] = layer_costs(stack, 2, small, W, n)
    res[f"attn_ctx{big}"] = layer_costs(stack, 2, big, W, n)
    del stack
    head, mtp = Head(cfg), MTPHead(cfg)
    prepare(head)
    prepare(mtp)
    x = (0.1 * mx.random.normal((1, 1, W + 3))).astype(mx.bfloat16)
    res["head_T1_ms"] = round(timed(lambda: mx.eval(head.logits(head.norm(x))), n), 3)
    caches = mtp.make_caches()
    emb = head.embed(mx.array([[5]]))
    mx.eval(mtp(x, emb, caches))
    res["mtp_T1_ms"] = round(timed(lambda: (mx.eval(mtp(x, emb, caches)), caches[0].rewind(1)), n), 3)
    for T in (1, 2, 3, 4):     # the whole model: 36 GDN + 12 attention layers (8k context) + the PLE extra
        g, p, a = res["gdn"][f"T{T}_ms"], res["gdn_ple"][f"T{T}_ms"], res[f"attn_ctx{big}"][f"T{T}_ms"]
        res[f"model_T{T}_ms"] = round(36 * g + 12 * a + (p - g), 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main("--shrink" in sys.argv)
