"""Qwen3.8-27B (model_type qwen3_5, Qwen3.6-27B's shapes, a dense 15-tensor MTP head): the same
parity and identity checks as Qwen3.5, on its structure at shrunk widths."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from mlx_lm.utils import load_model

from mtpdist.engine.driver import generate, run_all
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.errors import ModelLoadError
from mtpdist.model.loader import load_parts
from mtpdist.model.synthetic import SIZES, write_checkpoint
from mtpdist.model.weights import Checkpoint

from helpers import Layers as LocalTrunk, OracleDrafter, local_session, plain_greedy, spec_greedy
from test_model_parity import TOKENS, assert_close, our_logits
from test_scheduler_pipeline import session_over
from workers import workers

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14]
MTP_KEYS = {"mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
            *(f"mtp.layers.0.{k}.weight" for k in (
                "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))}


def test_shape_is_the_27b_structure(qwen38_27b):
    path, _ = qwen38_27b
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    full = SIZES["27b"]
    assert cfg["model_type"] == "qwen3_5" and not cfg["tie_word_embeddings"]
    assert (text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"],
            text["linear_num_key_heads"], text["linear_num_value_heads"]) == (full[1], full[2], full[3], full[5], full[6])
    mtp = {k for k in Checkpoint(path).keys if k.startswith("mtp.")}
    assert mtp == MTP_KEYS and len(mtp) == 15     # the Qwen3.5 dense MTP layout


def test_raw_checkpoint_matches_mlx_lm_prefill_and_decode(qwen38_27b):
    path, _ = qwen38_27b
    ref, _ = load_model(path)
    assert_close(our_logits(path), ref(TOKENS))
    ref_cache, parts = ref.make_cache(), load_parts(path)
    trunk = LocalTrunk(parts.stack)
    for x in (TOKENS[:, :9], TOKENS[:, 9:10], TOKENS[:, 10:13]):
        assert_close(parts.head.logits(parts.head.norm(trunk.forward(parts.head.embed(x)))), ref(x, cache=ref_cache))


def test_greedy_mtp_identical_to_plain(qwen38_27b):
    parts = load_parts(qwen38_27b[0], mtp=True)
    want = plain_greedy(parts, PROMPT, 24, step=4)
    assert spec_greedy(parts, PROMPT, 24, step=4)[0] == want
    got, stats = spec_greedy(parts, PROMPT, 20, step=4, depth=3, drafter=OracleDrafter(
        PROMPT + want + [0, 0, 0], parts.config.vocab_size, wrong=lambda i: i % 5 in (0, 3)))
    assert got == want[:20] and 0 < stats.accepted < stats.drafted


def test_greedy_mtp_through_two_workers(qwen38_27b, tmp_path):
    path = qwen38_27b[0]
    local = local_session(path, prefill_step=8)
    reqs = [GenerationRequest(tuple(PROMPT), 16, mtp=True, mtp_depth=2), GenerationRequest((7, 9), 16, mtp=False)]
    # The reference is plain greedy decoding (no MTP) in one process.
    want = [generate(Scheduler(local.generator, local, SchedulerSettings(reuse_prefixes=False)),
                     replace(r, mtp=False)).token_ids for r in reqs]
    with workers(2, tmp_path) as ws:
        session = session_over(path, [w.address for w in ws])
        sinks = run_all(Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8)), reqs, timeout=180)
        assert [s.wait().token_ids for s in sinks] == want
        session.close()


def test_community_conversion_without_mtp_weights_is_refused_clearly(qwen38_27b, tmp_path):
    """HF conversions keep `mtp_num_hidden_layers: 1` but drop the mtp.* tensors."""
    path, w = qwen38_27b
    raw = json.loads((path / "config.json").read_text())
    stripped = {k: v for k, v in Checkpoint(path).tensors(lambda k: not k.startswith("mtp.")).items()}
    out = write_checkpoint(tmp_path / "nomtp", raw, {"model.language_model." + k[len("model."):]
                                                     if k.startswith("model.") else k: v for k, v in stripped.items()})
    with pytest.raises(ModelLoadError, match="no mtp.. tensors"):
        load_parts(out, mtp=True)
    assert load_parts(out).head is not None     # plain decoding still loads
