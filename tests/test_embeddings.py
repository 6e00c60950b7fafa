"""The coordinator's kept embedding rows: bit for bit what the head computes, within budget."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mtpdist.engine.embeddings import KEEP_ROWS_UP_TO, EmbeddingRows
from mtpdist.model.loader import load_parts
from mtpdist.wire.activations import to_activation

DEMO = Path(__file__).resolve().parent.parent / "mtpdist" / "demo_model"


def _fresh(head, tokens) -> bytes:
    return bytes(to_activation(head.embed(mx.array(tokens))).data)


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_qwen4", "demo"])
def test_kept_rows_are_the_heads_own_bytes(model, request):
    fixture = None if model == "demo" else request.getfixturevalue(model)
    path = DEMO if fixture is None else fixture[0] if isinstance(fixture, tuple) else fixture
    head = load_parts(path, layers=(0, 0)).head
    rows = EmbeddingRows(head)
    units = [[5, 9, 5], [9], [7, 5, 3, 3], [1] * 3 + [2] * 2]
    for tokens in units + units:                # the second time, every row comes from what was kept
        act = rows.activation(tokens)
        assert act.shape[0] == len(tokens) and bytes(act.data) == _fresh(head, tokens)
    assert rows.hits > rows.misses > 0


def test_the_budget_holds_and_never_drops_a_row_the_unit_needs(tiny_dense):
    head = load_parts(tiny_dense[0], layers=(0, 0)).head
    row_bytes = len(_fresh(head, [0]))
    rows = EmbeddingRows(head, budget_bytes=3 * row_bytes)
    for tokens in ([1, 2, 3], [4], [1, 5, 6, 7, 8], [2, 3], [9, 9, 1]):
        assert bytes(rows.activation(tokens).data) == _fresh(head, tokens)
        assert rows.nbytes <= max(3, len(set(tokens))) * row_bytes
        assert all(t in rows.rows for t in tokens)
    # A prefill-sized unit is embedded as it is and kept nowhere.
    big = list(range(KEEP_ROWS_UP_TO + 1))
    before = dict(rows.rows)
    assert bytes(rows.activation(big).data) == _fresh(head, big)
    assert rows.rows == before
