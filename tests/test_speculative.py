"""Greedy decoding with MTP is token-identical to plain greedy decoding."""

from __future__ import annotations

import pytest

from mtpdist.model.loader import load_parts

from helpers import OracleDrafter, plain_greedy, spec_greedy

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14]  # 13 tokens: 4 prefill chunks of 4
N = 40


@pytest.fixture(scope="module")
def dense(tiny_dense):
    return load_parts(tiny_dense[0], mtp=True)


def test_random_mtp_head_mostly_rejects_yet_output_identical(dense):
    want = plain_greedy(dense, PROMPT, N, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4)
    assert got == want
    assert stats.drafted > 0 and stats.accepted < stats.drafted


def test_always_agreeing_drafter_accepts_everything_identically(dense):
    want = plain_greedy(dense, PROMPT, N + 2, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4,
                             drafter=OracleDrafter(PROMPT + want, dense.config.vocab_size))
    assert got == want[:N]
    assert stats.accepted == stats.drafted > N // 3


def test_mixed_accepts_and_rejects_identical(dense):
    want = plain_greedy(dense, PROMPT, N + 2, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4, drafter=OracleDrafter(
        PROMPT + want, dense.config.vocab_size, wrong=lambda i: i % 3 == 0))
    assert got == want[:N]
    assert 0 < stats.accepted < stats.drafted


def test_pre_norm_setting_is_also_lossless(dense):
    assert spec_greedy(dense, PROMPT, 24, post_norm=False)[0] == plain_greedy(dense, PROMPT, 24)


def test_single_token_prompt(dense):
    assert spec_greedy(dense, [7], 12)[0] == plain_greedy(dense, [7], 12)


def test_moe_model_identical(tiny_moe):
    parts = load_parts(tiny_moe[0], mtp=True)
    want = plain_greedy(parts, PROMPT, 30, step=5)
    got, _ = spec_greedy(parts, PROMPT, 30, step=5, drafter=OracleDrafter(
        PROMPT + want + [0, 0], parts.config.vocab_size, wrong=lambda i: i % 4 == 0))
    assert got == want


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_depth_k_identical_with_mostly_rejecting_head(dense, depth):
    want = plain_greedy(dense, PROMPT, N, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4, depth=depth)
    assert got == want
    assert stats.drafted > 0 and stats.accepted < stats.drafted


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_depth_k_always_agreeing_accepts_whole_chains(dense, depth):
    want = plain_greedy(dense, PROMPT, N + 2 * depth, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4, depth=depth,
                             drafter=OracleDrafter(PROMPT + want, dense.config.vocab_size))
    assert got == want[:N]
    assert stats.accepted == stats.drafted
    assert stats.verify_passes <= N // (depth + 1) + 2   # k+1 tokens per pass
    assert list(stats.acceptance_by_depth) == [1.0] * depth


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_depth_k_rewinds_every_length_identically(dense, depth):
    # Wrong drafts at varied chain positions: rewinds of 0..k tokens all happen.
    want = plain_greedy(dense, PROMPT, N + 2 * depth, step=4)
    drafter = OracleDrafter(PROMPT + want, dense.config.vocab_size, wrong=lambda i: i % 5 in (0, 3))
    got, stats = spec_greedy(dense, PROMPT, N, step=4, depth=depth, drafter=drafter)
    assert got == want[:N]
    assert 0 < stats.accepted < stats.drafted
    by_depth = list(stats.acceptance_by_depth)
    assert len(by_depth) == depth and by_depth == sorted(by_depth, reverse=True)


def test_auto_depth_identical_and_settles(dense):
    from mtpdist.engine.depth import AutoDepth
    want = plain_greedy(dense, PROMPT, 60, step=4)
    policy = AutoDepth(max_depth=3, warmup=2)
    got, stats = spec_greedy(dense, PROMPT, 60, step=4, depth=policy)
    assert got == want
    assert all(policy.rounds.get(k, 0) >= 2 for k in (1, 2, 3))  # every depth was measured
    assert 1 <= policy.choose() <= 3


class Alternating:
    """A depth policy that skips drafting on some rounds (what auto does when drafts stop paying)."""
    def __init__(self, pattern):
        self.pattern, self.i = pattern, 0

    def choose(self):
        self.i += 1
        return self.pattern[self.i % len(self.pattern)]

    def observe(self, depth, accepted, seconds, guessed=None):
        pass


def test_rounds_without_drafts_let_the_head_catch_up_exactly(dense):
    # An always-right oracle: every draft holds only if the MTP cache caught up with every
    # position the rounds without drafts skipped.
    want = plain_greedy(dense, PROMPT, N + 8, step=4)
    got, stats = spec_greedy(dense, PROMPT, N, step=4, depth=Alternating([0, 0, 2, 0, 3]),
                             drafter=OracleDrafter(PROMPT + want, dense.config.vocab_size))
    assert got == want[:N]
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    real, _ = spec_greedy(dense, PROMPT, N, step=4, depth=Alternating([0, 1, 0, 0, 2]))
    assert real == want[:N]
