"""A batched forward (several sequences' rows, ragged) equals each sequence run alone, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mtpdist.model.cache import GDNCache
from mtpdist.model.loader import load_parts


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_ragged_batch_equals_solo_runs_bit_for_bit(tiny_dense, dtype):
    parts = load_parts(tiny_dense[0], layers=(0, 8), head=False)
    parts.stack.set_dtype(dtype)
    stack, H = parts.stack, parts.config.hidden_size
    mx.random.seed(0)
    prompts = [(mx.random.normal((1, n, H)) * 0.5).astype(dtype) for n in (5, 9, 3, 7)]
    solo_caches = [stack.make_caches() for _ in prompts]
    batch_caches = [stack.make_caches() for _ in prompts]
    # Prefill: different lengths, one ragged batch against one run each.
    solo = [stack.ragged(p, [(c, p.shape[1], ())]) for p, c in zip(prompts, solo_caches)]
    batch = stack.ragged(mx.concatenate(prompts, axis=1), [(c, p.shape[1], ()) for p, c in zip(prompts, batch_caches)])
    rows = 0
    for p, s in zip(prompts, solo):
        assert mx.array_equal(s[0], batch[0, rows:rows + p.shape[1]]).item()
        rows += p.shape[1]
    # Decode steps and verify passes: same-length rows, whose recurrences run stacked.
    for T, keep in ((1, ()), (3, (1, 2)), (1, ())):
        xs = [(mx.random.normal((1, T, H)) * 0.5).astype(dtype) for _ in prompts]
        solo = [stack.ragged(x, [(c, T, keep)]) for x, c in zip(xs, solo_caches)]
        batch = stack.ragged(mx.concatenate(xs, axis=1), [(c, T, keep) for c in batch_caches])
        for i, s in enumerate(solo):
            assert mx.array_equal(s[0], batch[0, i * T:(i + 1) * T]).item()
    for a, b in zip(solo_caches, batch_caches):
        for x, y in zip(a, b):
            if isinstance(x, GDNCache):
                assert mx.array_equal(x.ssm, y.ssm).item() and mx.array_equal(x.conv, y.conv).item()
                assert sorted(x.snapshots) == sorted(y.snapshots)
            else:
                assert x.offset == y.offset and mx.array_equal(x.keys[..., :x.offset, :], y.keys[..., :y.offset, :]).item()
