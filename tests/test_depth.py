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
    assert b.current().best() == 0
    b.active = 1
    assert b.current().best() == 2
    assert set(b.summary()["by_active_sequences"]) == {1, 16}


def test_a_deep_position_seen_little_borrows_the_estimate_of_the_one_before():
    """Few unlucky tries of draft 3 in the warm-up must not lock the policy at depth 2: an
    estimate with little data leans on the draft before it, and an untried one is that estimate."""
    p = AutoDepth(max_depth=4)
    p.tried, p.held = [100, 80, 3, 0], [80, 72, 1, 0]
    c = p.conditional()
    assert c[0] == pytest.approx(81 / 102)
    assert c[2] > 0.5 and c[3] == c[2]
    assert c[1] > c[2] > 1 / 3


def test_a_stacked_rounds_bonus_guess_counts_as_the_next_draft():
    """With rounds in flight, whether a stacked round holds turns on the guess of the bonus token
    of the round under it: that is draft depth + 1's acceptance, learned from depth-k rounds."""
    p = AutoDepth(max_depth=4)
    for i in range(40):
        p.observe(2, 2, None, guessed=i % 10 != 0)    # 9 of 10 guesses held
    assert p.tried[2] == 40 and p.held[2] == 36
    assert p.conditional()[2] == pytest.approx((36 + 2 * p.conditional()[1]) / 42)
    p.observe(4, 4, None, guessed=True)               # no slot past the deepest draft
    assert len(p.tried) == 4


def test_depth_flag_values():
    assert parse_depth("auto") == "auto" and parse_depth("3") == 3
    for bad in ("0", "9", "x"):
        with pytest.raises(ValueError):
            parse_depth(bad)
    with pytest.raises(ValueError):
        FixedDepth(0)


def test_a_batch_that_chooses_together_sends_one_neighbour_in_each_revisit_period():
    """A batch's sequences all choose before any of them is observed again: the look at a
    neighbouring depth is one choice in `revisit_every`, not the whole batch at once."""
    p = AutoDepth(max_depth=4, warmup=2, revisit_every=32)
    feed(p, 60, time_of=lambda k: 1.0 + 0.4 * k, accept_of=lambda k: min(k, 1))   # depth 1 is best
    best = p.choose()
    picks = []
    for _ in range(8):                      # 8 batch steps of 16 sequences
        ks = [p.choose() for _ in range(16)]
        picks += ks
        for k in ks:
            p.observe(k, min(k, 1), 1.0 + 0.4 * k)
    assert best == 1
    assert 0 < sum(k != best for k in picks) <= len(picks) // 32


def test_a_round_that_waited_for_a_slot_counts_its_wait():
    """In a batch a round's cost runs from the end of the sequence's round before it (waiting for
    a slot included, which deeper rounds lengthen), not from when it was sent."""
    from mtpdist.engine.decoder import Round, SequenceDecoder, Step
    from mtpdist.engine.sampling import Sampler, SamplingParams

    def confirmed(ready_at, sent, stacked=False):
        dec = SequenceDecoder(None, Sampler(SamplingParams()), [1, 2, 3])
        step = Step("decode", (3,), (), 2)
        dec.rounds.append(Round(step, [], sent=sent, stacked=stacked))
        dec.ready_at = ready_at
        dec.confirm(step, [7], 0)
        return dec.round_start
    assert confirmed(10.0, 12.5) == 10.0      # it waited 2.5 s for a slot after its last round
    assert confirmed(None, 12.5) == 12.5      # its first round: from when it went out
    assert confirmed(10.0, 12.5, stacked=True) is None
