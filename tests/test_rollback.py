"""Snapshot + restore leaves every layer exactly where recomputing from scratch would."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import Layers
from mtpdist.model.cache import GDNCache
from mtpdist.model.loader import load_parts


def states(trunk):
    out = []
    for c in trunk.caches:
        if isinstance(c, GDNCache):
            out += [np.asarray(c.conv), np.asarray(c.ssm)]
        else:
            k, v = c.keys_and_values() if c.keys is not None else (None, None)
            out += [np.asarray(k), np.asarray(v)]
    return out


@pytest.mark.parametrize("rejected", [1, 2, 3])
def test_rewind_equals_recompute(tiny_dense, rejected):
    parts = load_parts(tiny_dense[0])
    embed = lambda ids: parts.head.embed(mx.array([ids]))
    prefix, verify, after = [3, 9, 27, 81, 5], [6, 7, 8, 9], [10]
    keep = len(verify) - rejected

    spec = Layers(parts.stack)
    spec.forward(embed(prefix))
    spec.forward(embed(verify), keep=tuple(range(1, len(verify))))
    spec.rewind(rejected)
    assert spec.offset == len(prefix) + keep
    h_spec = spec.forward(embed(after))

    fresh = Layers(parts.stack)
    h_fresh = fresh.forward(embed(prefix + verify[:keep] + after))
    np.testing.assert_allclose(np.asarray(h_spec[0, -1]), np.asarray(h_fresh[0, -1]), atol=1e-5)
    for a, b in zip(states(spec), states(fresh)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rewind_without_snapshot_is_refused(tiny_dense):
    parts = load_parts(tiny_dense[0])
    t = Layers(parts.stack)
    t.forward(parts.head.embed(mx.array([[1, 2, 3]])))
    with pytest.raises(ValueError, match="no snapshot"):
        t.rewind(1)
