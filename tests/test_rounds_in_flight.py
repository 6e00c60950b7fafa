"""Verify rounds of one sequence in flight together (speculative forwards across the pipeline):
greedy output stays identical to plain greedy decoding whatever the drafts, the depth, the
rounds in flight and the batch."""

from __future__ import annotations

import pytest

from mtpdist.engine.live import SchedulerSettings
from mtpdist.model.loader import load_parts

from mtpdist.engine.driver import CollectingSink
from mtpdist.engine.generate import GenerationRequest, Generator
from mtpdist.engine.scheduler import Scheduler

from helpers import InProcess, OracleDrafter, Pipelined, decode, plain_greedy

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


class Held(InProcess):
    """Every layer in this process; each unit's result waits until the test lets it back."""

    def __init__(self, parts, stages: int):
        super().__init__(parts)
        self.t.stages, self.held = stages, []
        send = self.t.send
        self.t.send = lambda rows, hidden, done: send(rows, hidden, lambda r: self.held.append((done, r)))

    def release(self) -> None:
        done, r = self.held.pop(0)
        done(r)


@pytest.mark.parametrize("depth", [1, 3])
def test_next_stacked_round_is_drafted_while_the_window_is_full(dense, depth):
    """While a sequence's window is full and nothing has come back, the scheduler drafts its next
    stacked round, which goes out as soon as a round returns; the output is unchanged."""
    want = plain_greedy(dense, PROMPT, N + 4 * depth + 4, step=4)
    oracle = OracleDrafter(PROMPT + want, dense.config.vocab_size)
    backend = Held(dense, 3)
    sched = Scheduler(Generator(dense, None, True, 4, make_drafter=lambda req: oracle), backend,
                      SchedulerSettings(reuse_prefixes=False, rounds_in_flight=3, max_inflight=3))
    sink = CollectingSink()
    sched.insert(GenerationRequest(tuple(PROMPT), N, mtp=True, mtp_depth=depth, ignore_eos=True), sink)
    while not sink.ended.is_set():
        sched.run_once(0)          # takes what came back
        sched.run_once(0)          # sends what can go; then, with nothing back, drafts ahead
        if backend.held:
            backend.release()      # one unit back at a time, as from a pipeline
    r = sink.wait(0)
    assert list(r.token_ids) == want[:N]
    assert r.rounds["voided"] == 0 and r.rounds["speculative"] >= 5
    # every stacked round but those that filled the window had its drafts ready
    assert r.rounds["drafted_ahead"] == r.rounds["speculative"] - 2


def test_a_long_run_of_holds_rebuilds_the_chain_at_the_backlog_bound(dense, monkeypatch):
    """Held rounds leave their verified rows for the head while the chain goes on; at the bound
    the sequence stops stacking until the chain is rebuilt, then stacks again."""
    from mtpdist.engine import decoder
    want = plain_greedy(dense, PROMPT, N + 12, step=4)
    _, free = stacked(dense, N, OracleDrafter(PROMPT + want, dense.config.vocab_size), 1)
    monkeypatch.setattr(decoder, "MAX_BACKLOG", 6)
    got, r = stacked(dense, N, OracleDrafter(PROMPT + want, dense.config.vocab_size), 1)
    assert got == want[:N]
    assert r.rounds["voided"] == 0 and 5 <= r.rounds["speculative"] < free.rounds["speculative"]


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


def test_sampling_with_rounds_in_flight_follows_the_target_joint(tiny_vocab32):
    """Two rounds of depth 1 in flight (the second one stacked on a guess of the first's bonus
    token): the first four tokens, which span both rounds, follow the target joint."""
    from mtpdist.engine.sampling import SamplingParams
    from test_sampling import joint_pvalue, sample_through_scheduler, target_joint

    parts = load_parts(tiny_vocab32, mtp=True)
    prompt, n, draws = [3, 1, 4, 1, 5], 4, 400
    joint = target_joint(parts, prompt, n, SamplingParams(temperature=1.0, top_k=2))
    settings = SchedulerSettings(reuse_prefixes=False, rounds_in_flight=2, max_inflight=2)
    stacked_rounds = []     # unseeded: a seeded request never stacks (its output must not depend on timing)
    drawn, accepted, drafted = sample_through_scheduler(parts, prompt, n, dict(temperature=1.0, top_k=2), 1, draws,
                                                        batch=1, backend=Pipelined(parts, 2, latency=0.002),
                                                        settings=settings, seeded=False,
                                                        on_result=lambda r: stacked_rounds.append(r.rounds["speculative"]))
    assert sum(stacked_rounds) > draws // 4
    assert 0 < accepted < drafted
    assert joint_pvalue(joint, drawn) > 1e-3


def test_snapshot_windows_are_freed_after_a_burst(dense):
    """Rounds in flight keep recurrent-state snapshots over their window; once the sequences end
    the workers' store holds nothing, and while they run it holds at most a window's worth."""
    want = plain_greedy(dense, PROMPT, N, step=4)
    backend = Pipelined(dense, 3)
    settings = SchedulerSettings(reuse_prefixes=False, rounds_in_flight=3, max_inflight=3)
    store = backend.t.store
    peak = []
    tidy = store.tidy

    def watched():          # what a forward leaves once the store has tidied after it
        tidy()
        gdn = [c for st in store.seqs.values() for c in st.caches if hasattr(c, "snapshots")]
        peak.append(max((len(c.snapshots) for c in gdn), default=0))
    store.tidy = watched
    got, r = decode(dense, PROMPT, N, step=4, mtp=True, depth=2, backend=backend, settings=settings)
    assert got == want and r.rounds["speculative"] > 0
    assert 0 < max(peak) <= 3 * 3 + 3          # three rounds of three rows (and their ends), no more
    assert not store.seqs and store.state_bytes() == 0
