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


def test_forgetting_drops_exactly_the_snapshots_below_a_position():
    """Passes, rewinds and forgets in a random order: `forget_before(p)` leaves exactly the
    snapshots at p and above (it relies on their being kept in ascending order)."""
    rng = np.random.default_rng(0)
    c, z = GDNCache(), mx.zeros((1,))
    floor = 0
    for _ in range(300):
        op = rng.integers(3)
        if op == 0:                                            # a pass of T rows, snapshots inside
            T = int(rng.integers(1, 5))
            cuts = sorted({int(k) for k in rng.integers(1, T + 1, size=2) if k < T})
            c.record(z, z, T, {k: (z, z) for k in cuts})
        elif op == 1 and c.offset > floor:                     # a rejection: back to a snapshot
            back = [c.offset - p for p in c.snapshots if floor <= p < c.offset]
            if back:
                c.rewind(int(rng.choice(back)))
        else:                                                  # the floor moves up to where the cache is
            floor = int(rng.integers(floor, c.offset + 1))
            want = sorted(p for p in c.snapshots if p >= floor)
            c.forget_before(floor)
            assert list(c.snapshots) == want                    # the same set, still in order
