"""The draft-depth policies: what they choose from measured acceptance and round times."""

from __future__ import annotations

from mtpdist.engine.depth import AutoDepth, BatchDepth, FixedDepth, parse_depth

import pytest


def feed(policy, rounds, time_of, accept_of):
    for _ in range(rounds):
        k = policy.choose()
        policy.observe(k, accept_of(k), time_of(k))


def test_auto_picks_deep_drafts_when_verify_rows_are_cheap_and_drafts_hold():
    p = AutoDepth(max_depth=4, warmup=2)
    feed(p, 60, time_of=lambda k: 1.0 + 0.05 * k, accept_of=lambda k: k)     # everything accepted
    assert p.choose() in (3, 4)


def test_auto_picks_no_draft_when_rows_are_dear_and_drafts_fail():
    p = AutoDepth(max_depth=3, warmup=2, allow_plain=True)
    feed(p, 60, time_of=lambda k: 1.0 + 1.0 * k, accept_of=lambda k: 0)      # rows cost a step each
    assert p.choose() == 0


def test_batch_depth_learns_each_batch_size_separately():
    b = BatchDepth(max_depth=2)
    b.active = 1
    feed(b, 40, time_of=lambda k: 1.0 + 0.01 * k, accept_of=lambda k: k)
    b.active = 16                                                             # at 16 streams rows are dear
    feed(b, 40, time_of=lambda k: 1.0 + 2.0 * k, accept_of=lambda k: 0)
    assert b.choose() == 0
    b.active = 1
    assert b.choose() == 2
    assert set(b.summary()["by_active_sequences"]) == {1, 16}


def test_depth_flag_values():
    assert parse_depth("auto") == "auto" and parse_depth("3") == 3
    for bad in ("0", "9", "x"):
        with pytest.raises(ValueError):
            parse_depth(bad)
    with pytest.raises(ValueError):
        FixedDepth(0)
