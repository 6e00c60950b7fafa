"""Placement as a pure function, and the stable worker id (authentication: test_security.py)."""

from __future__ import annotations

import pytest

from mtpdist.placement import PlacementError, keep_held, plan_layers


@pytest.mark.parametrize("n", range(1, 9))
def test_ranges_are_contiguous_cover_all_and_proportional(n):
    layers = [10] * 64
    mem = [1000 * (i + 1) for i in range(n)]
    p = plan_layers(mem, layers, headroom=0.1)
    assert p.ranges[0][0] == 0 and p.ranges[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(p.ranges, p.ranges[1:]))
    assert all(e > s for s, e in p.ranges)
    share = [(e - s) / 64 for s, e in p.ranges]
    for s, m in zip(share, mem):
        assert abs(s - m / sum(mem)) <= 1.5 / 64 + 1e-9


def test_headroom_and_refusal_with_arithmetic():
    gib = 1 << 30
    plan_layers([10 * gib, 10 * gib], [gib] * 18, headroom=0.1)          # 18 <= 2 x 9
    with pytest.raises(PlacementError, match=r"(?s)need 19.00 GiB; workers offer 18.00 GiB.*worker 0: 10.00 GiB usable"):
        plan_layers([10 * gib, 10 * gib], [gib] * 19, headroom=0.1)
    with pytest.raises(PlacementError, match="cannot be split across 3 workers"):
        plan_layers([gib] * 3, [1, 1])


def test_uneven_layers_follow_bytes_not_counts():
    p = plan_layers([100, 100], [50, 1, 1, 1, 1, 1, 1, 50], headroom=0.0)
    assert p.ranges == ((0, 4), (4, 8))
    assert plan_layers([300, 100], [1] * 8).ranges == ((0, 6), (6, 8))


def test_worker_id_is_stable_and_a_copied_folder_gets_a_new_one(tmp_path):
    import json

    from mtpdist.security import worker_id
    first = worker_id(tmp_path)
    assert worker_id(tmp_path) == first                      # persisted
    data = json.loads((tmp_path / "worker.json").read_text())
    data["machine"] = "another-mac/0123456789ab"             # as if the folder was copied from elsewhere
    (tmp_path / "worker.json").write_text(json.dumps(data))
    fresh = worker_id(tmp_path)
    assert fresh != first and worker_id(tmp_path) == fresh


def test_placement_balances_stage_time_when_speeds_are_known():
    from mtpdist.placement import plan_layers, stage_seconds
    layers = [100] * 12
    mem = [10_000, 10_000]
    even = plan_layers(mem, layers)
    assert even.ranges == ((0, 6), (6, 12))
    fast_slow = plan_layers(mem, layers, speed=[3.0, 1.0])        # the first Mac reads 3x faster
    assert fast_slow.ranges == ((0, 9), (9, 12))
    t = stage_seconds(fast_slow, [3.0, 1.0])
    assert max(t) == 300 and max(t) < max(stage_seconds(even, [3.0, 1.0]))
    capped = plan_layers([10_000, 560], layers, headroom=0.0, speed=[1.0, 100.0])  # fast but small
    assert capped.ranges == ((0, 7), (7, 12)) and capped.bytes_per_worker[1] <= 560
    with pytest.raises(PlacementError):
        plan_layers([300, 300], layers, headroom=0.0, speed=[1.0, 1.0])


def test_a_restart_keeps_held_ranges_unless_they_are_much_slower():
    layers, usable = [10] * 8, [1000, 1000]
    new = plan_layers(usable, layers, speed=[1.0, 0.6])          # noise made worker 1 look slower
    assert new.ranges != ((0, 4), (4, 8))
    kept = keep_held(new, [(0, 4), (4, 8)], usable, layers, speed=[1.0, 0.9])
    assert kept.ranges == ((0, 4), (4, 8)) and kept.bytes_per_worker == (40, 40)
    # Held ranges that make the slowest stage far worse, leave a gap, or do not fit are replaced.
    assert keep_held(new, [(0, 7), (7, 8)], usable, layers).ranges == new.ranges
    assert keep_held(new, [(0, 3), (4, 8)], usable, layers).ranges == new.ranges
    assert keep_held(new, [(0, 4), (4, 8)], [30, 1000], layers).ranges == new.ranges
    assert keep_held(new, [(0, 0), (0, 0)], usable, layers).ranges == new.ranges
