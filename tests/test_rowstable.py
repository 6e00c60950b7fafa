"""Row-stable paths (issue 17.2, for MLX's CUDA backend) change kernels, never values.

The CPU backend already computes a row alike whatever the pass's row count, so forcing
the row-stable paths on must leave every hidden state and logit bit-identical there; on
CUDA the same paths make verify rows equal steps (scripts/device_row_stable.py).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from helpers import Layers as LocalTrunk
from mtpdist.model import rowstable
from mtpdist.model.cache import copy_caches
from mtpdist.model.loader import load_parts


@pytest.fixture
def parts(tiny_dense):
    yield load_parts(tiny_dense[0])
    rowstable.set_mode(None)


def _run(parts, mode):
    """A verify-like pass (4 rows), a 3-sequence batch of decode rows, and logits of each."""
    rowstable.set_mode(mode)
    embed = lambda ids: parts.head.embed(mx.array([ids]))  # noqa: E731
    base = LocalTrunk(parts.stack)
    base.forward(embed([3, 9, 27, 81, 5, 11, 2]))
    one = LocalTrunk(parts.stack)
    one.caches = copy_caches(base.caches)
    h4 = one.forward(embed([6, 7, 8, 9]), keep=(1, 2, 3))
    one.rewind(2)
    h1 = one.forward(embed([40]))
    batch = [copy_caches(base.caches) for _ in range(3)]
    hb = parts.stack.ragged(embed([12, 13, 14]), [(c, 1, ()) for c in batch])
    out = [h4, h1, hb, parts.head.logits(parts.head.norm(h4)[0]), parts.head.logits(parts.head.norm(h1)[0, -1])]
    mx.eval(out)
    return out, [c.offset for c in one.caches]


@pytest.mark.parametrize("mode", ["on", "strict"])
def test_row_stable_paths_are_exact_on_cpu(parts, mode):
    ref, offsets = _run(parts, "off")
    got, got_offsets = _run(parts, mode)
    assert got_offsets == offsets
    for a, b in zip(ref, got):
        assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_padding_reaches_the_kernels_and_is_removed(parts):
    rowstable.set_mode("strict")
    seen = []
    rowstable_padded = rowstable.padded(lambda x: (seen.append(x.shape), x @ mx.ones((x.shape[-1], 3)))[1],
                                        mx.ones((1, 2, 16)))
    assert seen == [(rowstable.PAD_ROWS, 16)] and rowstable_padded.shape == (1, 2, 3)
    h = rowstable.pad_rows(mx.zeros((1, 3, 16)))
    assert h.shape == (1, rowstable.PAD_ROWS, 16)
    rowstable.set_mode("on")
    assert rowstable.pad_rows(mx.zeros((1, 3, 16))).shape == (1, 3, 16)


def test_identity_note_and_modes(monkeypatch):
    monkeypatch.setenv("MTPDIST_ROW_STABLE", "auto")
    rowstable.set_mode(None)
    assert rowstable.mode() == "off"  # the CPU backend needs none
    assert rowstable.identity_note().startswith("exact")
    monkeypatch.setenv("MTPDIST_ROW_STABLE", "strict")
    assert rowstable.strict() and rowstable.enabled()
    with pytest.raises(ValueError):
        rowstable.set_mode("sometimes")


def test_generate_json_says_whether_greedy_output_is_exact(tiny_dense):
    import json
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(tiny_dense[0]), "--prompt",
                        "def main():", "--max-tokens", "4", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout)["greedy_identity"].startswith("exact: the CPU backend")
