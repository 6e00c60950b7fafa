"""Write the qwen4_exp golden files under tests/goldens/qwen4exp/ (run by hand, not in CI).

The reference is transformers' own `qwen4_exp` text model (CPU torch, float32 arithmetic on bf16-rounded weights, stored in bf16). It builds a
tiny random model from the config below, randomizes every weight (transformers initialises
norms to zero and the n-gram conv to zero, which would hide mistakes), saves it with
`save_pretrained` (so the checkpoint has the raw Hugging Face layout, n-gram table shards
included), and records logits for a prefill and a few decode passes on one cache.

    .venv/bin/pip install torch==2.13.0   # the CPU build; transformers is already installed
    .venv/bin/python scripts/gen_qwen4exp_goldens.py

Tests read the folder with plain MLX; torch is not needed to run them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import DynamicCache, Qwen4ExpForCausalLM, Qwen4ExpTextConfig

OUT = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "qwen4exp"
SEED = 1234
# Tiny, but every part is exercised: 3 GDN layers + 1 indexed-attention layer (twice), PLE on
# layer index 1 (so a stage boundary can fall before it), an indexer budget of 2 blocks of 4
# (a 21-token prompt has 5 complete blocks, so the top-k selection matters).
CONFIG = dict(
    vocab_size=160, hidden_size=32, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, hc_count=4, hc_lowrank=8,
    ple_layer_ids=[2], ple_embed_dim=32, ple_conv_kernel_size=4, ngram_size=3, heads_per_ngram=2,
    ngram_vocab_size_base=97, make_ngram_vocab_size_divisible_by=128, split_ngram_parts=4,
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
    output_gate_type="sigmoid", rms_norm_eps=1e-6, eos_token_id=1, tie_word_embeddings=False,
    max_position_embeddings=4096, full_attention_interval=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [1, 1, 0], "mrope_interleaved": True},
)
PROMPT = [5, 17, 9, 1, 42, 8, 20, 11, 7, 30, 12, 13, 2, 1, 1, 31, 64, 99, 150, 3, 77]
STEPS = [[18], [1], [120, 6, 44], [9]]  # decode passes after the prompt (one of 3 tokens: a verify)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every floating parameter random (norm weights near 0: they are stored as w in (1 + w))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("dt_bias"):
                continue
            scale = 0.2 if p.ndim == 1 else 0.5 / max(1.0, p.shape[-1] ** 0.5)
            if "ngram_embedding" in name or "embed_tokens" in name:
                scale = 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for p in model.parameters():  # the checkpoint is stored in bf16: compute with exactly those values
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def main() -> None:
    torch.manual_seed(SEED)
    cfg = Qwen4ExpTextConfig(**CONFIG)
    model = Qwen4ExpForCausalLM(cfg).float().eval()
    randomize(model, SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    cache = DynamicCache(config=cfg)
    logits = {}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True)
        logits["prefill"] = out.logits[0].numpy()
        for i, step in enumerate(STEPS):
            out = model(input_ids=torch.tensor([step]), cache=out.cache, use_cache=True)
            logits[f"step{i}"] = out.logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(OUT / "checkpoint", safe_serialization=True)
    (OUT / "checkpoint" / "generation_config.json").unlink(missing_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in logits.items()}, str(OUT / "logits.safetensors"))
    (OUT / "inputs.json").write_text(json.dumps({
        "reference": f"transformers {transformers.__version__} Qwen4ExpForCausalLM, torch {torch.__version__}, "
                     "float32, CPU", "seed": SEED, "prompt": PROMPT, "steps": STEPS}, indent=1))
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
