"""Verify rounds of one sequence in flight together (speculative forwards across the pipeline):
greedy output stays identical to plain greedy decoding whatever the drafts, the depth, the
rounds in flight and the batch."""

from __future__ import annotations

import pytest

from mtpdist.engine.live import SchedulerSettings
from mtpdist.model.loader import load_parts

from helpers import OracleDrafter, Pipelined, decode, plain_greedy

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14]
N = 40


@pytest.fixture(scope="module")
def dense(tiny_dense):
    return load_parts(tiny_dense[0], mtp=True)


def stacked(parts, n, drafter=None, depth=1, rounds=3, stages=3):
    settings = SchedulerSettings(reuse_prefixes=False, rounds_in_flight=rounds, max_inflight=stages)
    return decode(parts, PROMPT, n, step=4, mtp=True, drafter=drafter, depth=depth,
                  backend=Pipelined(parts, stages), settings=settings)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_always_right_head_keeps_rounds_in_flight_and_output_identical(dense, depth):
    want = plain_greedy(dense, PROMPT, N + 4 * depth + 4, step=4)
    got, r = stacked(dense, N, OracleDrafter(PROMPT + want, dense.config.vocab_size), depth)
    assert got == want[:N]
    assert r.rounds["max_in_flight"] == 3 and r.rounds["voided"] == 0
    assert r.accepted == r.drafted


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("every", [2, 3, 5, 7])
def test_rejections_at_every_position_void_later_rounds_and_output_identical(dense, depth, every):
    want = plain_greedy(dense, PROMPT, N + 4 * depth + 4, step=4)
    drafter = OracleDrafter(PROMPT + want, dense.config.vocab_size, wrong=lambda i: i % every == 0)
    got, r = stacked(dense, N, drafter, depth)
    assert got == want[:N]
    assert r.rounds["voided"] > 0 and r.rounds["wasted_rows"] > 0


@pytest.mark.parametrize("depth", [1, 3])
def test_real_mtp_head_with_rounds_in_flight_is_identical(dense, depth):
    want = plain_greedy(dense, PROMPT, N, step=4)
    got, _ = stacked(dense, N, None, depth)
    assert got == want
