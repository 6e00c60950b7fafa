"""Rescues (mtpdist/engine/rescue.py): while a verify round is out, the drafts of the round after
each of its likely outcomes are made ahead; a round that comes back with one of those outcomes
sends them at once. Output stays identical to plain greedy, and the head's cache stays in step
with the backbone's verified rows."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mtpdist.engine.decoder import SequenceDecoder
from mtpdist.engine.driver import CollectingSink
from mtpdist.engine.drafter import MTPDrafter
from mtpdist.engine.generate import GenerationRequest, Generator
from mtpdist.engine.live import SchedulerSettings
from mtpdist.engine.rescue import Rescues, second_choice
from mtpdist.engine.scheduler import Scheduler
from mtpdist.model.loader import load_parts

from helpers import InProcess, plain_greedy

DEMO = Path(__file__).parent.parent / "mtpdist" / "demo_model"
N = 40


@pytest.fixture(scope="module")
def demo():
    return load_parts(DEMO, mtp=True)


@pytest.fixture(scope="module")
def prompt(demo):
    from mlx_lm.utils import load_tokenizer
    return load_tokenizer(DEMO).encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


@pytest.fixture(autouse=True)
def head_in_step(monkeypatch):
    """Whenever verified rows go to the head, its cache must hold exactly the verified rows fed
    before (one per prompt row and per confirmed token not waiting in the backlog): every
    speculative entry, a rescue's included, was taken back first."""
    take = SequenceDecoder.take_backlog

    def checked(self):
        waiting = sum(len(t) for _, _, t in self.backlog)
        assert self.drafter.offset == self.body + len(self.confirmed) - waiting
        return take(self)
    monkeypatch.setattr(SequenceDecoder, "take_backlog", checked)


class Stepped(InProcess):
    """Every layer in this process; each unit's result waits until the test lets it back, so the
    scheduler drafts ahead (and makes rescues) between units, whatever this machine's speed."""

    def __init__(self, parts, stages: int):
        super().__init__(parts)
        self.t.stages, self.held = stages, []
        send = self.t.send
        self.t.send = lambda rows, hidden, done: send(rows, hidden, lambda r: self.held.append((done, r)))


def run(parts, prompt, depth: int, stages: int, rescue: bool = True, monkeypatch=None):
    if not rescue:
        monkeypatch.setattr(Rescues, "next_pass", lambda self, *a: False)
    backend = Stepped(parts, stages)
    sched = Scheduler(Generator(parts, None, True, 512), backend,
                      SchedulerSettings(reuse_prefixes=False, rounds_in_flight=stages, max_inflight=stages))
    sink = CollectingSink()
    sched.insert(GenerationRequest(tuple(prompt), N, mtp=True, mtp_depth=depth, ignore_eos=True), sink)
    while not sink.ended.is_set():
        sched.run_once(0)          # takes what came back
        sched.run_once(0)          # sends what can go; then, with nothing back, drafts ahead and rescues
        if backend.held:
            done, r = backend.held.pop(0)
            done(r)
    return sink.wait(0)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("depth", [1, 3])
def test_rescued_rounds_keep_greedy_output_identical(demo, prompt, depth, stages):
    want = plain_greedy(demo, prompt, N)
    r = run(demo, prompt, depth, stages)
    assert list(r.token_ids) == want
    assert r.rounds["rescued"] > 0          # the trained head's second choices do come true
    assert r.accepted < r.drafted           # and there were rejections to rescue


@pytest.mark.parametrize("stages", [1, 2])
def test_rescues_do_not_lower_acceptance(demo, prompt, stages, monkeypatch):
    """Drafts made from the chain's own state, not the backbone's verified rows, hold about as
    well (a misplaced cache entry would make them fail)."""
    with_rescues = run(demo, prompt, 3, stages)
    without = run(demo, prompt, 3, stages, rescue=False, monkeypatch=monkeypatch)
    assert without.rounds["rescued"] == 0 and with_rescues.rounds["rescued"] > 0
    assert list(with_rescues.token_ids) == list(without.token_ids)
    assert with_rescues.accepted / with_rescues.drafted >= without.accepted / without.drafted - 0.1


def test_second_choice_skips_the_first():
    logits = mx.array([0.0, 5.0, 3.0, 4.0])
    assert second_choice(logits, 1) == 3
    assert second_choice(logits, 3) == 1      # the first choice given, whatever the argmax says


def test_a_fork_leaves_the_head_it_came_from_alone(demo):
    d = MTPDrafter(demo.head, demo.mtp, True)
    h = mx.zeros((1, 4, demo.config.hidden_size))
    d.extend(h, h, [1, 2, 3, 4])
    last = d.last
    before = d.chain(7)
    mx.eval(before)
    f = d.fork(4, last)
    assert f.offset == 4 and d.offset == 5
    f.chain(9)
    f.chain(10)
    assert d.offset == 5 and f.offset == 6
    d.rewind(1)
    d.last = last
    assert mx.array_equal(d.chain(7), before)   # its entries were not overwritten by the fork's
    g = d.fork(4, last)
    assert mx.array_equal(g.chain(7), before)   # and a fork computes what the head would
