"""Shared fixtures: tiny random-weight Qwen3.5 checkpoints written once per session."""

from __future__ import annotations

import os

import pytest

from mtpdist.model.config import ModelConfig
from mtpdist.model.synthetic import make_config, random_weights, to_raw_hf, write_checkpoint


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Hashes and shards go to a temporary folder, never the user's ~/.cache."""
    os.environ["MTPDIST_CACHE"] = str(tmp_path_factory.mktemp("mtpdist-cache"))


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """8 layers (6 GDN, 2 attention), vocab 512, tied embeddings, MTP head, raw HF layout."""
    raw = make_config("tiny")
    w = random_weights(ModelConfig.from_dict(raw), seed=1)
    path = write_checkpoint(tmp_path_factory.mktemp("tiny_dense"), raw, to_raw_hf(w))
    return path, w


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """MoE variant, untied lm_head, sharded files, per-expert MTP experts (Qwen3.5 layout)."""
    raw = make_config("tiny", moe=True, tie=False)
    w = random_weights(ModelConfig.from_dict(raw), seed=2)
    path = write_checkpoint(tmp_path_factory.mktemp("tiny_moe"), raw, to_raw_hf(w, per_expert_mtp=True), shards=3)
    return path, w


@pytest.fixture(scope="session")
def tiny_moe_fused(tmp_path_factory):
    """MoE variant with fused gate_up_proj MTP experts (Qwen3.6 layout)."""
    raw = make_config("tiny", moe=True, tie=False, num_layers=4)
    w = random_weights(ModelConfig.from_dict(raw), seed=3)
    path = write_checkpoint(tmp_path_factory.mktemp("tiny_moe36"), raw, to_raw_hf(w, per_expert_mtp=False))
    return path, w


@pytest.fixture(scope="session")
def tiny_vocab32(tmp_path_factory):
    """A 32-token vocabulary, for statistical tests of sampled decoding."""
    raw = make_config("tiny", vocab_size=32, num_layers=4)
    w = random_weights(ModelConfig.from_dict(raw), seed=4)
    # Sharpen the logits a little so distributions are neither flat nor one-hot.
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * 0.5
    return write_checkpoint(tmp_path_factory.mktemp("v32"), raw, to_raw_hf(w), tokenizer=False)


@pytest.fixture(scope="session")
def qwen38_27b(tmp_path_factory):
    """Qwen3.8-27B's structure (model_type qwen3_5, Qwen3.6-27B's config: 64 layers, 24/4 heads,
    16/48 linear heads, untied lm_head, a dense MTP head) at shrunk widths, raw HF layout."""
    raw = make_config("27b-shape")
    w = random_weights(ModelConfig.from_dict(raw), seed=38)
    path = write_checkpoint(tmp_path_factory.mktemp("qwen38_27b"), raw, to_raw_hf(w), shards=2)
    return path, w


QWEN4_GOLDENS = __import__("pathlib").Path(__file__).parent / "goldens" / "qwen4exp"


@pytest.fixture(scope="session")
def tiny_qwen4(tmp_path_factory):
    """The golden tiny qwen4_exp (transformers' random weights, raw HF layout, n-gram table in
    shards) with the golden MTP head (release layout), in float32, plus a tokenizer."""
    import json

    import mlx.core as mx

    raw = json.loads((QWEN4_GOLDENS / "checkpoint" / "config.json").read_text())
    raw["mtp_num_hidden_layers"] = 1
    w = {**mx.load(str(QWEN4_GOLDENS / "checkpoint" / "model.safetensors")),
         **mx.load(str(QWEN4_GOLDENS / "mtp.safetensors"))}
    w = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()}
    path = write_checkpoint(tmp_path_factory.mktemp("tiny_qwen4"), raw, w)
    return path
