"""The scheduler: many sequences in flight, each one's output identical to running it alone."""

from __future__ import annotations

import pytest

import mlx.core as mx

from mtpdist.engine.generate import GenerationRequest
from mtpdist.model.config import ModelConfig
from mtpdist.model.synthetic import make_config, random_weights, to_raw_hf, write_checkpoint
from mtpdist.coordinator.local_session import LocalSession
from mtpdist.engine.plan import Candidate, PlanLimits, plan_units
from mtpdist.engine.driver import run_all
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.engine.driver import generate

from helpers import local_session  # noqa: E402

PROMPTS = [
    [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14],
    [7],
    list(range(30, 75)),
    [401, 402, 9, 9, 9, 1, 2],
]


# -- the planning function ----------------------------------------------------------------

def test_plan_sends_decode_first_and_spreads_sequences_over_stages():
    cands = [Candidate(f"d{i}", "decode", 1, i) for i in range(6)] + [Candidate("p", "prefill", 256, 0, 900)]
    units = plan_units(cands, inflight=0, active=7, limits=PlanLimits(stages=2, max_inflight=2, prefill_budget=256))
    assert len(units) == 2
    assert [k for k, _ in units[0]] == ["d0", "d1", "d2", "d3"]          # ceil(7/2) sequences per unit
    assert [k for k, _ in units[1]] == ["d4", "d5", "p"]
    assert units[1][-1] == ("p", 256)


def test_plan_respects_inflight_and_budget_and_prefers_short_prompts():
    lim = PlanLimits(stages=1, max_inflight=2, prefill_budget=100)
    assert plan_units([Candidate("a", "decode", 1, 0)], inflight=2, active=1, limits=lim) == []
    cands = [Candidate("long", "prefill", 100, 0, 2000), Candidate("short", "prefill", 30, 1, 30)]
    units = plan_units(cands, inflight=0, active=2, limits=lim)
    assert units == [[("short", 30)], [("long", 100)]]   # short first; a chunk is never cut to fill a budget
    two = plan_units(cands, inflight=0, active=2, limits=PlanLimits(stages=2, max_inflight=2, prefill_budget=100))
    assert two == [[("short", 30)], [("long", 100)]]                      # two stages: one unit each
    assert plan_units([], 0, 0, lim) == []
    small = [Candidate("a", "prefill", 40, 0, 40), Candidate("b", "prefill", 50, 1, 50)]
    assert plan_units(small, inflight=0, active=2, limits=lim) == [[("a", 40), ("b", 50)]]   # both fit one unit


def test_plan_one_sequence_per_unit_when_alone():
    lim = PlanLimits(stages=3, max_inflight=3, prefill_budget=64)
    units = plan_units([Candidate("a", "verify", 4, 0)], inflight=1, active=1, limits=lim)
    assert units == [[("a", 4)]]


# -- the scheduler over one in-process stage -----------------------------------------------

@pytest.fixture(scope="module")
def local(tiny_dense):
    return local_session(tiny_dense[0], mtp=True, prefill_step=8)


def solo(session: LocalSession, req: GenerationRequest) -> tuple[int, ...]:
    return generate(Scheduler(session.generator, session, SchedulerSettings(reuse_prefixes=False)), req).token_ids


def test_concurrent_requests_equal_solo_runs_local(local):
    reqs = [GenerationRequest(tuple(p), 20, mtp=i % 2 == 1, mtp_depth=1 + i % 3) for i, p in enumerate(PROMPTS)]
    reqs += [GenerationRequest(tuple(PROMPTS[0]), 20, mtp=True, mtp_depth=3)]
    want = [solo(local, GenerationRequest(r.prompt_ids, r.max_tokens)) for r in reqs]   # plain greedy
    sched = Scheduler(local.generator, local, SchedulerSettings(prefill_budget=8))
    sinks = run_all(sched, reqs, timeout=120)
    assert [s.wait().token_ids for s in sinks] == want
    assert sched.live == {} and local.transport().store.seqs == {}       # everything released


def test_joining_and_leaving_mid_generation(local):
    reqs = [GenerationRequest(tuple(p), n, mtp=True, mtp_depth=2) for p, n in zip(PROMPTS, (30, 5, 12, 25))]
    want = [solo(local, GenerationRequest(r.prompt_ids, r.max_tokens)) for r in reqs]
    sched = Scheduler(local.generator, local, SchedulerSettings(prefill_budget=8))
    sinks = run_all(sched, reqs, timeout=120, stagger=0.05)               # arrive while others decode
    assert [s.wait().token_ids for s in sinks] == want


def test_bad_request_fails_alone(local):
    sched = Scheduler(local.generator, local)
    sinks = run_all(sched, [GenerationRequest((), 5), GenerationRequest((3, 4), 5)], timeout=60)
    with pytest.raises(Exception, match="empty"):
        sinks[0].wait()
    assert len(sinks[1].wait().token_ids) == 5


# -- a chat's state reused across turns ----------------------------------------------------

@pytest.mark.parametrize("mtp", [False, True])
def test_second_turn_continues_from_the_first_and_matches_a_fresh_prefill(local, mtp):
    first = tuple(PROMPTS[2])
    sched = Scheduler(local.generator, local, SchedulerSettings(prefill_budget=8))
    r1 = run_all(sched, [GenerationRequest(first, 12, mtp=mtp, mtp_depth=2)])[0].wait()
    second = first + r1.token_ids + (77, 78, 79)
    r2 = run_all(sched, [GenerationRequest(second, 15, mtp=mtp, mtp_depth=2)])[0].wait()
    assert r2.cached_tokens == len(first) + len(r1.token_ids) - 1     # everything but the last token fed
    fresh = Scheduler(local.generator, local, SchedulerSettings(prefill_budget=8, reuse_prefixes=False))
    assert r2.token_ids == run_all(fresh, [GenerationRequest(second, 15)])[0].wait().token_ids
    assert r2.token_ids == solo(local, GenerationRequest(second, 15))
    # A request that extends only the first prompt continues from the end-of-prompt state.
    r3 = run_all(sched, [GenerationRequest(first + (5, 6), 6, mtp=mtp)])[0].wait()
    assert r3.cached_tokens == len(first) - 1
    assert r3.token_ids == solo(local, GenerationRequest(first + (5, 6), 6))


def test_kept_prefixes_are_evicted_under_memory_pressure_without_harm(tiny_dense):
    session = local_session(tiny_dense[0], prefill_step=8)
    stage = session.transport().store
    sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
    a = run_all(sched, [GenerationRequest(tuple(PROMPTS[2]), 8)])[0].wait()
    assert len(stage.prefixes) == 2                                      # end of prompt, end of turn
    recount = lambda: sum(c.nbytes() for caches in stage.prefixes.values() for c in caches)  # noqa: E731
    assert stage.prefix_bytes == recount() > 0
    stage.state_budget = 1                                               # memory runs short
    b = run_all(sched, [GenerationRequest(tuple(PROMPTS[0]) * 3, 8)])[0].wait()
    assert len(stage.prefixes) <= 1 and not stage.seqs
    assert stage.prefix_bytes == recount()
    again = run_all(sched, [GenerationRequest(tuple(PROMPTS[2]) + a.token_ids + (9,), 8)])[0].wait()
    assert again.token_ids == solo(session, GenerationRequest(tuple(PROMPTS[2]) + a.token_ids + (9,), 8))
    assert b.token_ids == solo(session, GenerationRequest(tuple(PROMPTS[0]) * 3, 8))


def test_auto_depth_in_a_batch_stays_identical(local):
    reqs = [GenerationRequest(tuple(p), 30, mtp=True, mtp_depth="auto") for p in PROMPTS]
    want = [solo(local, GenerationRequest(r.prompt_ids, r.max_tokens)) for r in reqs]
    sched = Scheduler(local.generator, local, SchedulerSettings(prefill_budget=8, reuse_prefixes=False))
    sinks = run_all(sched, reqs, timeout=120)
    assert [s.wait().token_ids for s in sinks] == want
    assert sched.auto_depth.policies                                          # it measured something


def test_trained_head_accepts_and_rejects_within_one_batch():
    """The bundled model's trained head: in one batch some drafts hold and some fail, at
    depth 2, and every sequence still equals its solo greedy output."""
    from mtpdist.coordinator.demo import DEMO_MODEL
    demo = local_session(DEMO_MODEL, mtp=True, prefill_step=16)
    prompts = ["def fibonacci(n):\n", "import os\n\n\ndef main(", "class Stack:\n    def push(self, x):\n",
               "for i in range(10):\n"]
    reqs = [GenerationRequest(demo.generator.encode(p), 24, mtp=True, mtp_depth=2) for p in prompts]
    want = [solo(demo, GenerationRequest(r.prompt_ids, r.max_tokens)) for r in reqs]
    sched = Scheduler(demo.generator, demo, SchedulerSettings(prefill_budget=16, reuse_prefixes=False))
    results = [s.wait() for s in run_all(sched, reqs, timeout=120)]
    assert [r.token_ids for r in results] == want
    assert sched.stats["max_unit_sequences"] == 4                          # all four shared forwards
    accepted, drafted = sum(r.accepted for r in results), sum(r.drafted for r in results)
    assert 0 < accepted < drafted


def test_message_boundaries_cut_chunks_and_reuse_is_bit_identical(tiny_dense):
    """Chunks end at multiples of the chunk size and at the request's boundaries, wherever the
    sequence starts: a request continued from state kept at a boundary runs the same chunks as
    one prefilled afresh, so its logits match bit for bit (logprobs compared exactly)."""
    session = local_session(tiny_dense[0], mtp=True, prefill_step=8)
    system = tuple(range(40, 63))                       # 23 tokens: a boundary at 23 (not a chunk multiple)
    a = system + (5, 6, 7, 8, 9, 10, 11)
    b = system + (12, 13, 14, 15)
    sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
    req = lambda p: GenerationRequest(p, 10, mtp=True, mtp_depth=2, boundaries=(len(system),), logprobs=2)  # noqa
    run_all(sched, [req(a)])[0].wait()
    assert [e.tokens for e in sched.prefixes.entries.values()][0] == system      # kept at the boundary
    reused = run_all(sched, [req(b)])[0]
    fresh = run_all(Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8, reuse_prefixes=False)),
                    [req(b)])[0]
    assert reused.wait().cached_tokens == len(system) and fresh.wait().cached_tokens == 0
    assert reused.wait().token_ids == fresh.wait().token_ids
    lp = lambda sink: [(t.token, t.logprob) for d in sink.deltas for t in (d.logprobs or ())]  # noqa: E731
    assert lp(reused) == lp(fresh) and len(lp(fresh)) == 10


def test_coordinator_keeps_mtp_caches_within_a_byte_budget(tiny_dense):
    from mtpdist.engine.prefix_cache import PrefixIndex
    session = local_session(tiny_dense[0], mtp=True, prefill_step=8)
    sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
    run_all(sched, [GenerationRequest(tuple(PROMPTS[2]), 6, mtp=True)])[0].wait()
    one = max(e.nbytes for e in sched.prefixes.entries.values())
    assert one > 0 and sched.prefixes.bytes == sum(e.nbytes for e in sched.prefixes.entries.values())
    small = PrefixIndex(capacity=64, max_bytes=one)
    for e in list(sched.prefixes.entries.values()):
        small.add(e)
    assert len(small.entries) == 1 and small.bytes <= one        # least recently kept went first


def test_a_head_of_several_layers_drafts_and_stays_identical(tmp_path):
    """config.json's mtp_num_hidden_layers > 1 (the demo tooling can grow a head): every layer
    loads, drafts chain through all of them, and the output is still plain greedy."""
    raw = make_config("tiny", mtp_layers=3)
    w = random_weights(ModelConfig.from_dict(raw), seed=5)
    session = local_session(write_checkpoint(tmp_path, raw, to_raw_hf(w)), mtp=True, prefill_step=8)
    assert len(session.parts.mtp.layers) == 3
    last = session.parts.mtp.layers[2].mlp.down_proj.weight
    assert mx.array_equal(last, w["mtp.layers.2.mlp.down_proj.weight"].astype(last.dtype))  # loaded, not fresh
    reqs = [GenerationRequest(tuple(p), 16, mtp=True, mtp_depth=1 + i % 3) for i, p in enumerate(PROMPTS)]
    want = [solo(session, GenerationRequest(r.prompt_ids, r.max_tokens)) for r in reqs]
    sinks = run_all(Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8)), reqs, timeout=120)
    results = [s.wait() for s in sinks]
    assert [r.token_ids for r in results] == want
    assert sum(r.drafted for r in results) > 0
