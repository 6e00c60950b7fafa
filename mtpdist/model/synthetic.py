"""Random-weight Qwen3.5 checkpoints in the raw Hugging Face layout, for tests and benches.

The files look like a real release: `model.language_model.*` keys, `mtp.*` keys,
GDN conv1d as [C, 1, K], norm weights stored as an offset from 1, fused MoE experts
for the backbone and (optionally) per-expert MTP experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .qwen35 import Head, LayerStack, MTPHead
from .weights import _is_shifted_norm

SIZES = {
    # name: (hidden, layers, heads, kv heads, head_dim, lin k heads, lin v heads, lin dim, ffn, vocab)
    "tiny": (64, 8, 4, 2, 16, 2, 4, 16, 128, 512),
    "demo": (256, 8, 4, 2, 64, 2, 4, 64, 768, 4096),
    "small": (512, 8, 8, 2, 64, 4, 8, 64, 1536, 32000),
    "medium": (1024, 12, 8, 2, 128, 8, 16, 128, 3072, 32000),
    "0.8b": (1024, 24, 8, 2, 256, 16, 16, 128, 3584, 248320),  # Qwen3.5-0.8B's shapes
    "9b": (4096, 32, 16, 4, 256, 16, 32, 128, 12288, 248320),  # Qwen3.5-9B's (untied lm_head)
    # Qwen3.5/3.6/3.8-27B's shapes (Qwen3.8-27B is model_type qwen3_5 with Qwen3.6-27B's config).
    "27b": (5120, 64, 24, 4, 256, 16, 48, 128, 17408, 248320),
    # The same structure with shrunk widths: 64 layers, 24/4 attention heads, 16/48 linear heads
    # (a GQA group of 6 and a GDN value/key ratio of 3, which the power-of-two sizes never hit).
    "27b-shape": (64, 64, 24, 4, 16, 16, 48, 8, 96, 512),
}
UNTIED = {"9b", "27b", "27b-shape"}  # sizes whose release has a separate lm_head


def make_config(size: str = "tiny", *, moe: bool = False, vocab_size: int | None = None,
                num_layers: int | None = None, tie: bool | None = None, mtp: bool = True,
                mtp_layers: int = 1) -> dict:
    """A raw-HF style config.json dict for a synthetic model (`tie` None: as the release of that size)."""
    if tie is None:
        tie = size not in UNTIED
    H, L, nh, nkv, hd, lk, lv, ld, ffn, V = SIZES[size]
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "hidden_size": H, "num_hidden_layers": num_layers or L,
        "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd,
        "linear_num_key_heads": lk, "linear_num_value_heads": lv,
        "linear_key_head_dim": ld, "linear_value_head_dim": ld, "linear_conv_kernel_dim": 4,
        "intermediate_size": ffn, "vocab_size": vocab_size or V, "rms_norm_eps": 1e-6,
        "full_attention_interval": 4, "tie_word_embeddings": tie,
        "max_position_embeddings": 32768, "mtp_num_hidden_layers": mtp_layers if mtp else 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]},
        "eos_token_id": 1,
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=ffn // 4,
                    shared_expert_intermediate_size=ffn // 2, decoder_sparse_step=1)
    arch = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
    return {"architectures": [arch], "model_type": "qwen3_5_moe" if moe else "qwen3_5",
            "text_config": text, "tie_word_embeddings": tie}


def random_weights(config: ModelConfig, seed: int = 0, dtype=mx.float32) -> dict[str, mx.array]:
    """Canonical-layout random weights (effective norms, conv [C,K,1], fused experts)."""
    mx.random.seed(seed)
    parts = {"model.": Head(config), "model.layers.": LayerStack(config, 0, config.num_hidden_layers),
             "mtp.": MTPHead(config)}
    out = {}
    for prefix, module in parts.items():
        for k, v in tree_flatten(module.parameters()):
            if prefix == "model.layers.":
                k = k[len("layers."):]
            if prefix == "model." and k.startswith("lm_head"):
                key = k
            else:
                key = prefix + k
            if _is_shifted_norm(key, v) or key.endswith("linear_attn.norm.weight"):
                v = 1.0 + 0.2 * mx.random.normal(v.shape)
            out[key] = v.astype(dtype) if key.split(".")[-1] != "A_log" else v
    if config.mtp_num_hidden_layers == 0:
        out = {k: v for k, v in out.items() if not k.startswith("mtp.")}
    return out


def to_raw_hf(weights: dict[str, mx.array], per_expert_mtp: bool = True) -> dict[str, mx.array]:
    """Canonical weights -> raw Hugging Face layout (what a Qwen release ships)."""
    out = {}
    fused = {}
    for k, v in weights.items():
        if ".switch_mlp." in k:
            base, proj = k.split(".switch_mlp.")
            fused.setdefault(base, {})[proj.split("_")[0]] = v
            continue
        if k.endswith("conv1d.weight"):
            v = v.swapaxes(1, 2)
        elif _is_shifted_norm(k, v):
            v = v - 1.0
        out[_raw_name(k)] = v
    for base, p in fused.items():
        if base.startswith("mtp.") and per_expert_mtp:
            for proj in ("gate", "up", "down"):
                for e in range(p[proj].shape[0]):
                    out[f"{base}.experts.{e}.{proj}_proj.weight"] = p[proj][e]
        else:
            out[_raw_name(f"{base}.experts.gate_up_proj")] = mx.concatenate([p["gate"], p["up"]], axis=-2)
            out[_raw_name(f"{base}.experts.down_proj")] = p["down"]
    return out


def _raw_name(k: str) -> str:
    return "model.language_model." + k[len("model."):] if k.startswith("model.") else k


def write_checkpoint(out_dir: str | Path, raw_config: dict, weights: dict[str, mx.array],
                     shards: int = 1, tokenizer: bool = True) -> Path:
    """Write config.json, safetensors (optionally sharded with an index) and a tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    keys = sorted(weights)
    weight_map = {}
    for i in range(shards):  # always with an index, as real releases ship (mlx-lm's sharded_load needs it)
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i::shards]}
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer:
        from .tokenizer_gen import write_tokenizer
        text = raw_config.get("text_config", raw_config)
        write_tokenizer(out, text["vocab_size"])
    return out


def make_synthetic(out_dir: str | Path, size: str = "tiny", *, moe: bool = False, seed: int = 0,
                   shards: int = 1, per_expert_mtp: bool = True, **kw) -> Path:
    """One call: config + random weights written as a raw Hugging Face checkpoint."""
    raw = make_config(size, moe=moe, **kw)
    weights = random_weights(ModelConfig.from_dict(raw), seed=seed)
    return write_checkpoint(out_dir, raw, to_raw_hf(weights, per_expert_mtp), shards=shards)
