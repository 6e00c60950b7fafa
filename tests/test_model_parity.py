"""Our backbone equals mlx-lm's qwen3_5 on raw and converted checkpoints; the MTP head loads."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from helpers import Layers
from mtpdist.model.convert import ConvertOptions, convert
from mtpdist.model.loader import load_parts
from mtpdist.model.weights import Checkpoint

TOKENS = mx.array([[5, 17, 9, 3, 42, 8, 20, 11, 7, 30, 12, 13, 2, 1, 0, 31]])


def our_logits(path, layers=None):
    parts = load_parts(path)
    h = Layers(parts.stack).forward(parts.head.embed(TOKENS))
    return parts.head.logits(parts.head.norm(h))


def assert_close(a, b, tol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("fixture", ["tiny_dense", "tiny_moe", "tiny_moe_fused"])
def test_raw_checkpoint_matches_mlx_lm(fixture, request):
    path, _ = request.getfixturevalue(fixture)
    ref, _ = load_model(path)
    assert_close(our_logits(path), ref(TOKENS))


def test_converted_checkpoint_matches_mlx_lm_and_raw(tiny_dense, tmp_path):
    path, _ = tiny_dense
    out = convert(path, tmp_path / "mlx", ConvertOptions(dtype="float32"))
    ref, _ = load_model(out)
    ours = our_logits(out)
    assert_close(ours, ref(TOKENS))
    # Shifting the norms twice (or never) would move the logits far from the raw model's.
    assert_close(ours, our_logits(path))


def test_norm_shift_applied_exactly_once(tiny_dense, tmp_path):
    path, canonical = tiny_dense
    raw = Checkpoint(path)
    assert raw.raw_layout
    got = raw.tensors(lambda k: True)
    for key in ("model.norm.weight", "mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight",
                "mtp.pre_fc_norm_embedding.weight", "model.layers.3.self_attn.q_norm.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.0.linear_attn.norm.weight"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(canonical[key]), atol=1e-6)
    converted = Checkpoint(convert(path, tmp_path / "c", ConvertOptions(dtype="float32")))
    assert not converted.raw_layout
    again = converted.tensors(lambda k: True)
    for key in ("model.norm.weight", "mtp.norm.weight", "mtp.layers.0.input_layernorm.weight"):
        tol = 1e-2 if key.startswith("mtp.") else 1e-6  # the MTP head is stored in bf16 by default
        np.testing.assert_allclose(np.asarray(again[key].astype(mx.float32)), np.asarray(canonical[key]), atol=tol)


@pytest.mark.parametrize("fixture", ["tiny_moe", "tiny_moe_fused"])
def test_moe_mtp_experts_load_in_both_layouts(fixture, request):
    path, canonical = request.getfixturevalue(fixture)
    parts = load_parts(path, head=False, layers=(0, 0), mtp=True)
    for proj in ("gate", "up", "down"):
        got = parts.mtp.layers[0].mlp.switch_mlp[f"{proj}_proj"].weight
        want = canonical[f"mtp.layers.0.mlp.switch_mlp.{proj}_proj.weight"]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quantized_conversion_matches_mlx_lm(tiny_moe, tmp_path):
    path, _ = tiny_moe
    out = convert(path, tmp_path / "q", ConvertOptions(dtype="float32", quantize=True, q_bits=4,
                                                      q_group_size=32, mtp_precision="quantized"))
    ref, _ = load_model(out)
    assert_close(our_logits(out), ref(TOKENS))
    parts = load_parts(out, mtp=True)
    assert hasattr(parts.mtp.fc, "scales")  # the MTP head was quantized as asked


def test_partial_stack_loads_only_its_layers(tiny_dense):
    path, _ = tiny_dense
    full = load_parts(path)
    a = load_parts(path, layers=(0, 3), head=False)
    b = load_parts(path, layers=(3, 8), head=False)
    assert len(a.stack.layers) == 3 and len(b.stack.layers) == 5
    x = full.head.embed(TOKENS)
    split = b.stack(a.stack(x, a.stack.make_caches()), b.stack.make_caches())
    whole = full.stack(x, full.stack.make_caches())
    np.testing.assert_array_equal(np.asarray(split), np.asarray(whole))


@pytest.mark.parametrize("fixture", ["tiny_dense", "tiny_moe"])
def test_decode_steps_match_mlx_lm_with_caches(fixture, request):
    """Short passes (the compiled small-T GDN path) after a prefill, against mlx-lm's own caches."""
    path, _ = request.getfixturevalue(fixture)
    ref, _ = load_model(path)
    ref_cache = ref.make_cache()
    parts = load_parts(path)
    trunk = Layers(parts.stack)
    steps = [TOKENS[:, :10], TOKENS[:, 10:11], TOKENS[:, 11:13], TOKENS[:, 13:14], TOKENS[:, 14:16]]
    for x in steps:
        want = ref(x, cache=ref_cache)
        got = parts.head.logits(parts.head.norm(trunk.forward(parts.head.embed(x))))
        assert_close(got, want)


@pytest.mark.parametrize("fixture", ["tiny_dense", "tiny_moe"])
def test_64_decoded_tokens_match_mlx_lm_generate(fixture, request):
    """An independent oracle for the whole path: mlx-lm's own greedy generation from its own
    qwen3_5 model, against ours through the scheduler (plain, and MTP depth 2)."""
    from mlx_lm.generate import generate_step

    from helpers import decode
    path, _ = request.getfixturevalue(fixture)
    ref, _ = load_model(path)
    prompt = [5, 17, 9, 3, 42, 8, 20, 11, 7, 30, 12, 13]
    want = [int(t) for t, _ in zip((tok for tok, _ in generate_step(mx.array(prompt), ref, max_tokens=64)),
                                   range(64))]
    parts = load_parts(path, mtp=True)
    assert decode(parts, prompt, 64, step=5)[0] == want
    assert decode(parts, prompt, 64, step=5, mtp=True, depth=2)[0] == want
