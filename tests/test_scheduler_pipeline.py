"""The scheduler through real worker processes: streams in flight together, each identical to
running alone; cancellation; a short request during a long prefill; a worker killed mid-flight."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from mtpdist.coordinator.session import PipelineSession
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.driver import CollectingSink, run_all
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.engine.driver import generate
from mtpdist.wire.client import ChannelSettings, WorkerClient

from helpers import local_session
from workers import workers

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14], [7], list(range(30, 75)), [401, 402, 9, 9, 9, 1, 2]]


@pytest.fixture(scope="module")
def reference(tiny_dense):
    local = local_session(tiny_dense[0], prefill_step=8)

    def solo(prompt, n):
        return generate(Scheduler(local.generator, local, SchedulerSettings(reuse_prefixes=False)),
                        GenerationRequest(tuple(prompt), n)).token_ids
    return solo


def session_over(model, addresses, **kw):
    return PipelineSession(model, addresses, mtp=True, prefill_step=8, progress=False,
                           channel=ChannelSettings(step_timeout=10), **kw)


def live_sequences(addresses):
    out = []
    for a in addresses:
        c = WorkerClient(a)
        out.append(c.describe().sequences)
        c.close()
    return out


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_concurrent_streams_identical_to_solo(tmp_path, tiny_dense, reference, n_workers):
    reqs = [GenerationRequest(tuple(p), 24, mtp=i != 1, mtp_depth=1 + i % 3) for i, p in enumerate(PROMPTS)]
    want = [reference(r.prompt_ids, r.max_tokens) for r in reqs]
    with workers(n_workers, tmp_path) as ws:
        session = session_over(tiny_dense[0], [w.address for w in ws])
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
        sinks = run_all(sched, reqs, timeout=180)
        assert [s.wait().token_ids for s in sinks] == want
        assert sched.stats["max_unit_sequences"] >= 2          # sequences shared forwards
        assert live_sequences(session.addresses) == [0] * n_workers
        session.close()


def test_cancel_frees_state_on_every_worker(tmp_path, tiny_dense):
    with workers(2, tmp_path) as ws:
        session = session_over(tiny_dense[0], [w.address for w in ws])
        sched = Scheduler(session.generator, session)
        keep, drop = CollectingSink(), CollectingSink()
        sched.insert(GenerationRequest(tuple(PROMPTS[2]), 400, mtp=True), drop)
        sched.insert(GenerationRequest(tuple(PROMPTS[0]), 30, mtp=True), keep)
        while len(drop.deltas) < 3:
            sched.run_once(0.02)
        assert live_sequences(session.addresses) == [2, 2]
        drop.cancel.set()
        while not (drop.ended.is_set() and keep.ended.is_set()):
            sched.run_once(0.02)
        assert len(keep.wait().token_ids) == 30 and drop.result is None
        for _ in range(50):          # releases are fire-and-forget
            sched.run_once(0.02)
            if live_sequences(session.addresses) == [0, 0]:
                break
        assert live_sequences(session.addresses) == [0, 0]
        session.close()


def test_short_request_overtakes_a_long_prefill(tmp_path, tiny_dense):
    """Emulated stages (20 ms + 0.5 ms per extra row): a 4-token request that arrives while a
    600-token prompt is being prefilled in 64-token chunks gets its first token long before."""
    with workers(2, tmp_path, "--emulate-ms", "20,0.5") as ws:
        session = PipelineSession(tiny_dense[0], [w.address for w in ws], prefill_step=64, progress=False)
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=64))
        long_prompt = tuple((7 * i) % 500 + 1 for i in range(600))
        sinks = run_all(sched, [GenerationRequest(long_prompt, 3), GenerationRequest((5, 6, 7, 8), 3)],
                        timeout=120, stagger=0.1)
        long, short = sinks
        assert short.first_token_at < long.first_token_at
        assert short.first_token_at - short.created < 0.5 * (long.first_token_at - long.created)
        session.close()


def test_sigkill_with_several_sequences_in_flight(tmp_path, tiny_dense, reference):
    reqs = [GenerationRequest(tuple(p), 60, mtp=True, mtp_depth=2) for p in PROMPTS]
    want = [reference(r.prompt_ids, r.max_tokens) for r in reqs]
    with workers(3, tmp_path) as ws:
        session = session_over(tiny_dense[0], [w.address for w in ws])
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
        killed = threading.Event()
        sinks = [CollectingSink() for _ in reqs]
        for r, s in zip(reqs, sinks):
            sched.insert(r, s)
        while not all(s.ended.is_set() for s in sinks):
            sched.run_once(0.02)
            if not killed.is_set() and sum(len(s.deltas) for s in sinks) >= 12:
                os.kill(ws[1].proc.pid, signal.SIGKILL)
                killed.set()
        assert killed.is_set()
        assert [s.wait().token_ids for s in sinks] == want
        assert len(session.addresses) == 2                    # re-planned over the two left
        session.close()


def test_faster_worker_gets_more_layers(tmp_path, tiny_dense):
    """Workers report their weight-read speed; a 3x faster Mac gets the larger share of layers."""
    from mtpdist.coordinator.local_cluster import LocalWorker
    fast = LocalWorker(tmp_path / "fast", "--read-gbps", "300")
    slow = LocalWorker(tmp_path / "slow", "--read-gbps", "100")
    try:
        session = session_over(tiny_dense[0], [slow.address, fast.address])
        assert [i.read_gbps for i in session.infos] == [100.0, 300.0]
        (s0, e0), (s1, e1) = session.placement.ranges
        assert e1 - s1 > e0 - s0
        reqs = [GenerationRequest(tuple(PROMPTS[0]), 10, mtp=True)]
        sched = Scheduler(session.generator, session)
        assert len(run_all(sched, reqs)[0].wait().token_ids) == 10
        session.close()
    finally:
        fast.stop()
        slow.stop()


def test_chat_turns_reuse_worker_state_and_survive_a_lost_worker(tmp_path, tiny_dense, reference):
    first = tuple(PROMPTS[2])
    with workers(3, tmp_path) as ws:
        session = session_over(tiny_dense[0], [w.address for w in ws])
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
        r1 = run_all(sched, [GenerationRequest(first, 10, mtp=True, mtp_depth=2)])[0].wait()
        assert [i.prefixes for i in map(lambda a: WorkerClient(a).describe(), session.addresses)] == [2, 2, 2]
        second = first + r1.token_ids + (77, 78)
        want = reference(second, 40)
        sink = CollectingSink()
        sched.insert(GenerationRequest(second, 40, mtp=True, mtp_depth=2), sink)
        killed = False
        while not sink.ended.is_set():
            sched.run_once(0.02)
            if not killed and len(sink.deltas) >= 3:
                os.kill(ws[0].proc.pid, signal.SIGKILL)      # replay must rebuild the kept prefix too
                killed = True
        r2 = sink.wait()
        assert r2.cached_tokens == len(first) + len(r1.token_ids) - 1
        assert r2.token_ids == want
        session.close()


def test_stalled_worker_mid_flight_gives_identical_output(tmp_path, tiny_dense, reference):
    """A deadline passes while a worker is stopped: the scheduler re-plans over the workers that
    answer (the survivor still holds the old state: replays use fresh ids) with the same output."""
    reqs = [GenerationRequest(tuple(p), 30, mtp=True) for p in PROMPTS[:2]]
    want = [reference(r.prompt_ids, r.max_tokens) for r in reqs]
    with workers(2, tmp_path) as ws:
        session = PipelineSession(tiny_dense[0], [w.address for w in ws], mtp=True, prefill_step=8, progress=False,
                                  channel=ChannelSettings(step_timeout=1.0))
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
        sinks = [CollectingSink() for _ in reqs]
        for r, s in zip(reqs, sinks):
            sched.insert(r, s)
        stopped = False
        while not all(s.ended.is_set() for s in sinks):
            sched.run_once(0.02)
            if not stopped and sum(len(s.deltas) for s in sinks) >= 6:
                os.kill(ws[1].proc.pid, signal.SIGSTOP)
                threading.Timer(1.3, os.kill, (ws[1].proc.pid, signal.SIGCONT)).start()
                stopped = True
        assert [s.wait().token_ids for s in sinks] == want
        session.close()
