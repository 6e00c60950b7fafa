"""MTP runs wherever plain decoding runs: backend dtype gaps and quantized heads."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mtpdist.coordinator.session import PipelineSession
from mtpdist.model.backend import experts_to_supported_dtype, gather_mm_supports
from mtpdist.model.convert import ConvertOptions, convert
from mtpdist.model.loader import load_parts

from helpers import plain_greedy, spec_greedy
from workers import workers

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14]
N = 16


@pytest.fixture(scope="module")
def q4_moe_bf16_mtp(tiny_moe, tmp_path_factory):
    """A 4-bit MoE model whose MTP head stays bf16 (convert's default): its experts are unquantized."""
    return convert(tiny_moe[0], tmp_path_factory.mktemp("q4moe") / "m",
                   ConvertOptions(quantize=True, q_bits=4, q_group_size=32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_probe_matches_what_the_experts_can_do(dtype):
    layer = SwitchLinear(64, 32, num_experts=4, bias=False)
    layer.update({"weight": layer.weight.astype(dtype)})
    supported = gather_mm_supports(dtype)
    cast = experts_to_supported_dtype(layer)
    assert layer.weight.dtype == (dtype if supported else mx.float32)
    assert cast == ([] if supported else [""])
    x = mx.random.normal((3, 1, 1, 64)).astype(dtype)
    y = layer(x, mx.array([[0], [2], [3]], dtype=mx.uint32))
    mx.eval(y)  # raised "[GatherMM::eval] Currently only supports float32" on CPU before the cast
    assert gather_mm_supports(mx.float32)


def test_bf16_mtp_head_on_quantized_moe_is_lossless(q4_moe_bf16_mtp):
    parts = load_parts(q4_moe_bf16_mtp, mtp=True)
    assert parts.mtp.fc.weight.dtype == mx.bfloat16 and not hasattr(parts.mtp.fc, "scales")
    experts = parts.mtp.layers[0].mlp.switch_mlp.gate_proj
    assert not hasattr(experts, "scales")
    assert experts.weight.dtype == (mx.bfloat16 if gather_mm_supports(mx.bfloat16) else mx.float32)
    want = plain_greedy(parts, PROMPT, N, step=5)
    got, stats = spec_greedy(parts, PROMPT, N, step=5)
    assert got == want and stats.drafted > 0


def test_bf16_mtp_head_on_quantized_moe_through_workers(q4_moe_bf16_mtp, tmp_path):
    want = plain_greedy(load_parts(q4_moe_bf16_mtp), PROMPT, N, step=5)
    with workers(2, tmp_path) as procs:
        s = PipelineSession(q4_moe_bf16_mtp, [p.address for p in procs], mtp=True, progress=False, prefill_step=5)
        try:
            got, stats = spec_greedy(s.parts, PROMPT, N, step=5, backend=s)
        finally:
            s.close()
    assert got == want and stats.drafted > 0


def test_one_row_logits_equal_a_batch_row_on_a_quantized_head(q4_moe_bf16_mtp):
    """Head.logits takes a single [H] row (what the drafter passes); on CUDA this once raised."""
    head = load_parts(q4_moe_bf16_mtp, layers=(0, 0)).head
    assert hasattr(head.lm_head, "scales")
    x = head.norm(head.embed(mx.array([[3, 9, 27]])))
    batch = head.logits(x[0])
    one = head.logits(x[0, -1])
    assert one.shape == (head.lm_head.weight.shape[0],)
    np.testing.assert_allclose(np.asarray(one.astype(mx.float32)), np.asarray(batch[-1].astype(mx.float32)),
                               rtol=2e-2, atol=2e-2)
