"""The verify-curve bench: every timed pass starts from the same cache state, and the CLI's JSON."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from mtpdist.coordinator.bench_verify import _restore, _save
from mtpdist.cli import main
from mtpdist.model import layers
from mtpdist.model.loader import load_parts

CONTEXT = mx.array([[5, 17, 99, 3, 42, 8, 200, 11, 7]])


def test_restore_puts_every_cache_back_exactly(tiny_dense):
    parts = load_parts(tiny_dense[0])
    head, stack = parts.head, parts.stack

    def step(caches):
        return head.logits(head.norm(stack(head.embed(mx.array([[300]])), caches)))

    fresh = stack.make_caches()
    stack(head.embed(CONTEXT), fresh)
    offsets = [c.offset for c in fresh]
    want = step(fresh)
    caches = stack.make_caches()
    stack(head.embed(CONTEXT), caches)
    saved = _save(caches)
    for T in (1, 3, 6):  # a 6-token pass crosses SMALL_T: both GDN paths
        stack(head.embed(mx.array([[1, 2, 3, 4, 5, 6][:T]])), caches, tuple(range(1, T)))
        _restore(caches, saved)
    assert [c.offset for c in caches] == offsets
    np.testing.assert_array_equal(np.asarray(step(caches)), np.asarray(want))


def test_cli_writes_a_curve_per_small_t(tiny_dense, tmp_path, capsys):
    out = tmp_path / "curve.json"
    shipped = layers.SMALL_T
    assert main(["bench", "--model", str(tiny_dense[0]), "--verify-curve", "--max-t", "3", "--cycles", "1",
                 "--small-t", "9", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert set(result["curves"]) == {f"small_t={shipped}", "small_t=9"}
    for curve in result["curves"].values():
        assert list(curve["verify_over_step"]) == ["1", "2", "3"] and curve["verify_over_step"]["1"] == 1.0
        assert all(v > 0 for v in curve["verify_ms"].values())
    assert layers.SMALL_T == shipped  # the experiment knob is put back
