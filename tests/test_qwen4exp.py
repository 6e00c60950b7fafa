"""qwen4_exp (Qwen3.8-Flash-Next): logits equal transformers' own `qwen4_exp` (golden files made
by scripts/gen_qwen4exp_goldens.py), stages split anywhere, and every new per-sequence state
(indexer keys, n-gram token and conv history) rolls back exactly."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from helpers import Layers as LocalTrunk
from mtpdist.model.cache import copy_caches
from mtpdist.model.convert import ConvertOptions, convert
from mtpdist.model.loader import load_parts
from mtpdist.model.qwen4exp_cache import IndexedKVCache, PLEGDNCache
from mtpdist.model.synthetic import write_checkpoint
from mtpdist.model.weights import Checkpoint

from conftest import QWEN4_GOLDENS

INPUTS = json.loads((QWEN4_GOLDENS / "inputs.json").read_text())
GOLD = mx.load(str(QWEN4_GOLDENS / "logits.safetensors"))


@pytest.fixture(scope="module")
def golden_f32(tmp_path_factory):
    """The golden checkpoint in float32, so the (1 + w) norm shift happens in float32 as in the reference."""
    out = tmp_path_factory.mktemp("q4gold")
    shutil.copy(QWEN4_GOLDENS / "checkpoint" / "config.json", out / "config.json")
    w = mx.load(str(QWEN4_GOLDENS / "checkpoint" / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"),
                        {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()})
    return out


def logits_of(parts, trunk, tokens):
    return parts.head.logits(parts.head.norm(trunk.forward(parts.head.embed(mx.array([tokens])))))[0]


def assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def test_prefill_and_decode_match_transformers(golden_f32):
    parts = load_parts(golden_f32)
    trunk = LocalTrunk(parts.stack)
    assert_close(logits_of(parts, trunk, INPUTS["prompt"]), GOLD["prefill"])
    for i, step in enumerate(INPUTS["steps"]):
        assert_close(logits_of(parts, trunk, step), GOLD[f"step{i}"])


def test_goldens_exercise_the_sparse_selection(golden_f32):
    """With the indexer's budget raised (plain dense attention) the logits move: the golden
    prompt is long enough for the top-k block choice to matter."""
    cfg = json.loads((golden_f32 / "config.json").read_text())
    cfg["indexer_budget"] = 4096
    dense = golden_f32.parent / "dense"
    dense.mkdir(exist_ok=True)
    (dense / "config.json").write_text(json.dumps(cfg))
    shutil.copy(golden_f32 / "model.safetensors", dense / "model.safetensors")
    parts = load_parts(dense)
    got = np.asarray(logits_of(parts, LocalTrunk(parts.stack), INPUTS["prompt"]))
    assert np.max(np.abs(got - np.asarray(GOLD["prefill"]))) > 1e-3


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_stages_split_anywhere(golden_f32, cut):
    """The streams and token-id columns cross the boundary: before the n-gram layer (1), right
    after it (2), or later; the split output equals the whole stack's."""
    whole = load_parts(golden_f32)
    a = load_parts(golden_f32, layers=(0, cut), head=False)
    b = load_parts(golden_f32, layers=(cut, 8), head=False)
    x = whole.head.embed(mx.array([INPUTS["prompt"]]))
    mid = a.stack(x, a.stack.make_caches())
    assert mid.shape[-1] == whole.config.hidden_size == 4 * 32 + 3
    np.testing.assert_allclose(np.asarray(b.stack(mid, b.stack.make_caches())),
                               np.asarray(whole.stack(x, whole.stack.make_caches())), atol=1e-6)


def _state(caches):
    """Every array (and token history) a sequence's caches hold, for exact comparison."""
    out = []
    for c in caches:
        if isinstance(c, IndexedKVCache):
            out += [c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.ikeys[:c.offset],
                    c.pooled[:c.n_pooled] if c.n_pooled else mx.zeros((0,))]
        else:
            out += [c.conv, c.ssm]
            if isinstance(c, PLEGDNCache):
                out += [mx.array(c.ple_tokens), c.ple_conv]
    return [np.asarray(a) for a in out]


@pytest.mark.parametrize("rewind", [1, 2, 3, 4])
def test_every_new_state_rolls_back_exactly(golden_f32, rewind):
    """A verify pass of 5 rows crossing an indexer block boundary (positions 22-26), then a
    rewind: the state equals a fresh run of the kept tokens, and so does what comes next."""
    parts = load_parts(golden_f32)
    prompt, tail = INPUTS["prompt"], [18, 1, 120, 6, 44]
    a = LocalTrunk(parts.stack)
    a.forward(parts.head.embed(mx.array([prompt])))
    a.forward(parts.head.embed(mx.array([tail])), keep=(1, 2, 3, 4))
    a.rewind(rewind)
    b = LocalTrunk(parts.stack)
    b.forward(parts.head.embed(mx.array([prompt + tail[:5 - rewind]])))
    assert a.offset == b.offset == len(prompt) + 5 - rewind
    kinds = {type(c) for c in a.caches}
    assert IndexedKVCache in kinds and PLEGDNCache in kinds
    for x, y in zip(_state(a.caches), _state(b.caches)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    nxt = [9, 33]
    assert_close(logits_of(parts, a, nxt), logits_of(parts, b, nxt))


def test_copied_state_is_independent(golden_f32):
    """Prefix copies (kept turns) carry the new state too and do not share later writes."""
    parts = load_parts(golden_f32)
    t = LocalTrunk(parts.stack)
    t.forward(parts.head.embed(mx.array([INPUTS["prompt"]])))
    saved = copy_caches(t.caches)
    want = logits_of(parts, t, [5, 6, 7])
    t.caches = saved
    assert_close(logits_of(parts, t, [5, 6, 7]), want)


def test_converted_checkpoint_equals_raw(tiny_qwen4, tmp_path):
    """convert (MLX layout, one n-gram table tensor, MTP head kept) loads back to the same model."""
    out = convert(tiny_qwen4, tmp_path / "c", ConvertOptions(dtype="float32", mtp_precision="quantized"))
    raw, conv = load_parts(tiny_qwen4, mtp=True), load_parts(out, mtp=True)
    toks = INPUTS["prompt"]
    assert_close(logits_of(conv, LocalTrunk(conv.stack), toks), logits_of(raw, LocalTrunk(raw.stack), toks))
    assert not Checkpoint(out).raw_layout and Checkpoint(out).has_mtp()


def test_quantized_conversion_rules(tiny_qwen4, tmp_path):
    """-q: routers, shared-expert gates and inject weights at 8 bits; rows the group (64) does not
    divide (this model's width 32, like the release's 160-wide n-gram rows) at group 32."""
    out = convert(tiny_qwen4, tmp_path / "q", ConvertOptions(dtype="float32", quantize=True, q_bits=4,
                                                             q_group_size=64))
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["language_model.model.layers.0.mlp.gate"] == {"group_size": 32, "bits": 8}   # width 32
    assert q["language_model.model.layers.3.attn_hyper_connection.block_inject_weight"]["bits"] == 8
    assert q["language_model.model.layers.0.linear_attn.in_proj_qkv"] == {"group_size": 32, "bits": 4}
    parts = load_parts(out, mtp=True)
    layer = parts.stack.layers[3]
    assert (layer.mlp_hyper_connection.block_inject_weight.bits, layer.self_attn.indexer.index_qk_proj.bits,
            layer.self_attn.indexer.index_qk_proj.group_size) == (8, 4, 32)
    assert "scales" not in parts.mtp.fc_embedding       # the MTP head stays bf16 by default
    raw = load_parts(tiny_qwen4)
    a = np.asarray(logits_of(parts, LocalTrunk(parts.stack), INPUTS["prompt"]))
    b = np.asarray(logits_of(raw, LocalTrunk(raw.stack), INPUTS["prompt"]))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9   # 4-bit noise, not a different model


def test_fp8_release_layout_loads(tiny_qwen4, tmp_path):
    """The FP8 release: experts as E4M3 bytes with 128x128-block inverse scales, the n-gram table
    shards as E4M3 with one scale. They load as bf16 within FP8's precision, and convert."""
    raw = json.loads((tiny_qwen4 / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    src = {k: v for k, v in mx.load(str(tiny_qwen4 / "model.safetensors")).items()}
    shards = sorted(k for k in src if ".ngram_embedding.shard_" in k)
    table_scale = max(float(mx.abs(src[k]).max()) for k in shards) / 448
    out = {}
    for k, v in src.items():
        if ".experts." in k and k.startswith("model.layers."):
            s = mx.abs(v).max() / 448
            out[k], out[k + "_scale_inv"] = mx.to_fp8(v / s), s.reshape(1, 1)
        elif k in shards:
            out[k] = mx.to_fp8(v / table_scale)
        else:
            out[k] = v
    out["model.layers.1.ple.ple_embedding.ngram_embedding.weight_scale"] = mx.array(table_scale)
    fp8 = write_checkpoint(tmp_path / "fp8", raw, out)
    want, got = Checkpoint(tiny_qwen4).tensors(lambda k: True), Checkpoint(fp8).tensors(lambda k: True)
    assert set(got) == set(want)
    for k in ("model.layers.1.ple.ple_embedding.ngram_embedding.weight", "model.layers.0.mlp.switch_mlp.up_proj.weight"):
        assert got[k].dtype == mx.bfloat16
        np.testing.assert_allclose(np.asarray(got[k].astype(mx.float32)), np.asarray(want[k]), rtol=0.07,
                                   atol=0.02 * float(mx.abs(want[k]).max()))
    conv = load_parts(convert(fp8, tmp_path / "c", ConvertOptions(dtype="float32")), mtp=True)
    a = np.asarray(logits_of(conv, LocalTrunk(conv.stack), INPUTS["prompt"]))
    ref = load_parts(tiny_qwen4)
    b = np.asarray(logits_of(ref, LocalTrunk(ref.stack), INPUTS["prompt"]))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_placement_counts_the_ngram_table_with_its_layer(tiny_qwen4):
    """The table's bytes belong to the layer that owns it, so placement plans memory with them."""
    from mtpdist.coordinator.session import layer_bytes
    sizes = layer_bytes(tiny_qwen4, 8)
    table = 4 * 128 * 8 * 4          # 4 shards of 128 rows x 8 wide, float32
    assert sizes[1] - sizes[0] >= table and sizes[1] - sizes[2] >= table


def test_ragged_batch_equals_each_sequence_alone(golden_f32):
    """Several sequences in one forward (a worker's batch): prefills of different lengths, then
    same-length decode rows (the stacked GDN path, with PLE state per sequence) and verify rows."""
    parts = load_parts(golden_f32)
    stack, head = parts.stack, parts.head
    prompts = [INPUTS["prompt"], [7, 1, 9, 30, 31], list(range(40, 52))]
    alone = [LocalTrunk(stack) for _ in prompts]
    together = [stack.make_caches() for _ in prompts]
    passes = [prompts, [[3], [4], [5]], [[6, 7, 8], [9, 10, 11], [12, 13, 14]]]
    for rows in passes:
        keep = tuple(range(1, len(rows[0])))
        want = [t.forward(head.embed(mx.array([r])), keep) for t, r in zip(alone, rows)]
        x = head.embed(mx.array([[tok for r in rows for tok in r]]))
        got = stack.ragged(x, [(c, len(r), keep if len(set(map(len, rows))) == 1 else ()) for c, r in zip(together, rows)])
        np.testing.assert_allclose(np.asarray(got), np.asarray(mx.concatenate(want, axis=1)), atol=2e-5)


def test_indexer_takes_exactly_k_blocks_even_when_scores_tie():
    """ReLU scores tie at 0; each query still attends to exactly budget/ratio complete blocks
    plus its own incomplete block (and to every block while it sees no more than that)."""
    from mtpdist.model.qwen4exp_layers import Indexer, Qwen4Extras
    text = json.loads((QWEN4_GOLDENS / "checkpoint" / "config.json").read_text())
    e = Qwen4Extras.from_text(text)                     # budget 8, ratio 4: two blocks
    ix = Indexer(e)
    T = 23
    mask = np.asarray(ix.mask(mx.zeros((T, (e.idx_heads + 1) * e.idx_dim)), IndexedKVCache(), 0))
    for p in range(T):
        seen = (p + 1) // 4
        assert mask[p, seen * 4:p + 1].all() and not mask[p, p + 1:].any()      # own block, causal
        assert mask[p, :seen * 4].reshape(seen, 4).all(axis=1).sum() == min(seen, 2)
