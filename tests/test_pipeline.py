"""Layers split over real worker processes: identical output, refused bad calls, shard-only weights."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mtpdist.coordinator.session import PipelineSession
from mtpdist.wire.activations import to_activation
from mtpdist.coordinator.shards import ShardSource
from mtpdist.errors import WorkerCallError
from mtpdist.model.loader import load_parts
from mtpdist.wire.client import WorkerClient
from mtpdist.wire.types import ForwardCall, ShardSpec, TensorInfo

from helpers import OracleDrafter, plain_greedy, spec_greedy
from workers import WorkerProcess, workers

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14]
N = 24


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    with workers(3, tmp_path_factory.mktemp("cache")) as procs:
        yield [p.address for p in procs]


@pytest.fixture(scope="module")
def reference(tiny_dense):
    parts = load_parts(tiny_dense[0], mtp=True)
    return parts, plain_greedy(parts, PROMPT, N + 2, step=4)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_identical_through_workers(n, three_workers, tiny_dense, reference):
    parts, want = reference
    s = PipelineSession(tiny_dense[0], three_workers[:n], mtp=True, progress=False, prefill_step=4)
    assert s.placement.ranges[0][0] == 0 and s.placement.ranges[-1][1] == 8
    assert plain_greedy(s.parts, PROMPT, N, step=4, backend=s) == want[:N]
    got, stats = spec_greedy(s.parts, PROMPT, N, step=4, backend=s)  # random head: rejections
    assert got == want[:N] and stats.accepted < stats.drafted
    oracle = OracleDrafter(PROMPT + want, parts.config.vocab_size, wrong=lambda i: i % 3 == 0)
    got, stats = spec_greedy(s.parts, PROMPT, N, step=4, drafter=oracle, backend=s)
    assert got == want[:N] and 0 < stats.accepted < stats.drafted
    s.close()


def test_batched_sequences_through_workers_identical(three_workers, tiny_dense, reference):
    """Several sequences in one scheduler, mixed heads and depths, through 2 workers: each the
    same as alone."""
    from mtpdist.engine.driver import run_all
    from mtpdist.engine.generate import GenerationRequest, Generator
    from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
    parts, want = reference
    s = PipelineSession(tiny_dense[0], three_workers[:2], mtp=True, progress=False, prefill_step=4)
    prompts = [PROMPT, PROMPT[3:], PROMPT[:7] + [9, 9]]
    alone = [plain_greedy(parts, p, N, step=4) for p in prompts]
    sched = Scheduler(Generator(s.parts, None, True, 4), s, SchedulerSettings(reuse_prefixes=False))
    reqs = [GenerationRequest(tuple(p), N, mtp=i > 0, mtp_depth=i, ignore_eos=True) for i, p in enumerate(prompts)]
    got = [list(x.wait().token_ids) for x in run_all(sched, reqs, timeout=300)]
    assert got == alone and sched.stats["max_unit_sequences"] > 1
    s.close()


def test_logits_close_to_single_process(three_workers, tiny_dense, reference):
    from mtpdist.wire.activations import from_activation
    parts, _ = reference
    s = PipelineSession(tiny_dense[0], three_workers, progress=False)
    x = parts.head.embed(mx.array(PROMPT))
    r = s.clients[0].forward(ForwardCall.single("cmp", 0, to_activation(x), next=tuple(s.addresses[1:])))
    local = parts.stack.ragged(x[None], [(parts.stack.make_caches(), len(PROMPT), ())])[0]
    np.testing.assert_allclose(np.asarray(from_activation(r.hidden)), np.asarray(local), atol=1e-5)
    s.close()


def test_bad_calls_get_the_right_status_and_worker_keeps_serving(three_workers, tiny_dense):
    s = PipelineSession(tiny_dense[0], three_workers[:1], progress=False)
    c = WorkerClient(three_workers[0])
    h = to_activation(mx.zeros((2, 64)))

    def code(call):
        with pytest.raises(WorkerCallError) as e:
            c.forward(call)
        return e.value.code

    assert c.forward(ForwardCall.single("seq-a", 0, h)).position == 2
    assert code(ForwardCall.single("seq-a", 5, h)) == "FAILED_PRECONDITION"     # wrong position
    assert code(ForwardCall.single("seq-a", 0, h, epoch=1)) == "FAILED_PRECONDITION"  # no snapshot to go back to
    assert code(ForwardCall.single("never-seen", 3, h)) == "NOT_FOUND"
    assert c.release("seq-a") and not c.release("seq-a")
    assert code(ForwardCall.single("seq-a", 2, h)) == "NOT_FOUND"              # released
    bad = to_activation(mx.zeros((2, 64)))
    assert code(ForwardCall.single("x", 0, type(bad)(bad.data[:-4], bad.dtype, bad.shape))) == "INVALID_ARGUMENT"
    assert code(ForwardCall.single("x", 0, type(bad)(bad.data, "int8", bad.shape))) == "INVALID_ARGUMENT"
    assert code(ForwardCall.single("x", 0, to_activation(mx.zeros((2, 63))))) == "INVALID_ARGUMENT"
    assert code(ForwardCall.single("x", 0, h, snapshots=(5,))) == "INVALID_ARGUMENT"
    assert c.health() == "serving"
    assert c.forward(ForwardCall.single("seq-b", 0, h)).position == 2   # still serving
    c.release("seq-b")
    s.close()


def test_worker_holds_only_its_shard_and_restarts_from_cache(tmp_path, tiny_dense):
    path = tiny_dense[0]
    w = WorkerProcess(tmp_path / "cache")
    try:
        s = PipelineSession(path, [w.address], progress=False)  # one worker: layers 0-7
        s.close()
        c = WorkerClient(w.address)
        src = ShardSource(path, 2, 5)
        spec = ShardSpec(s.model_hash, 2, 5, (path / "config.json").read_text(), src.manifest(s.model_hash))
        r = c.load_shard(spec, src.chunks())
        assert r.source == "stream"                      # layers 2-4 alone were never sent before
        info = c.describe()
        assert (info.layer_start, info.layer_end) == (2, 5)
        assert info.weight_bytes == src.nbytes           # nothing outside layers 2-4 is held
        stored = mx.load(str(tmp_path / "cache" / "shards" / s.model_hash / "2-5" / "model.safetensors"))
        assert {int(k.split(".")[2]) for k in stored} == {2, 3, 4}
        outside = ShardSpec(s.model_hash, 6, 7, spec.config_json, (TensorInfo("model.layers.0.x", "F32", (1,), 4),))
        with pytest.raises(WorkerCallError) as e:
            c.load_shard(outside, [b"\0" * 4])
        assert e.value.code == "INVALID_ARGUMENT"
    finally:
        w.stop()
    w2 = WorkerProcess(tmp_path / "cache")          # restarted: the shard comes from its cache
    try:
        assert WorkerClient(w2.address).load_shard(spec).source == "cache"
    finally:
        w2.stop()
    w3 = WorkerProcess(tmp_path / "other", "--model-dir", str(path))  # its own copy of the model
    try:
        assert WorkerClient(w3.address).load_shard(spec).source == "model-dir"
    finally:
        w3.stop()


def test_cli_generate_through_workers_matches_single_process(three_workers, tiny_dense):
    import subprocess
    import sys
    args = [sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(tiny_dense[0]), "--prompt",
            "class Foo:", "--max-tokens", "10", "--json", "--mtp"]
    local = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    remote = json.loads(subprocess.run(args + ["--worker", three_workers[0], "--worker", three_workers[1], "--insecure"],
                                       capture_output=True, text=True, check=True).stdout)
    assert remote["token_ids"] == local["token_ids"] and remote["drafted"] > 0


def test_evicted_sequence_gets_a_clear_error(tmp_path, tiny_dense):
    w = WorkerProcess(tmp_path / "c", "--max-sequences", "2")
    try:
        PipelineSession(tiny_dense[0], [w.address], progress=False).close()
        c = WorkerClient(w.address)
        h = to_activation(mx.zeros((2, 64)))
        for seq in ("a", "b", "c"):                  # the third pushes out the least recently used
            c.forward(ForwardCall.single(seq, 0, h))
        with pytest.raises(WorkerCallError) as e:
            c.forward(ForwardCall.single("a", 2, h))
        assert e.value.code == "NOT_FOUND" and "evicted (too many sequences)" in e.value.details
        assert c.forward(ForwardCall.single("b", 2, h)).position == 4   # the others are untouched
        assert c.describe().sequences == 2
    finally:
        w.stop()


@pytest.mark.parametrize("n,depth", [(1, 4), (2, 2), (3, 3)])
def test_depth_k_through_workers_with_agreeing_and_failing_heads(n, depth, three_workers, tiny_dense, reference):
    """Depth k through 1-3 real workers: the random head (mostly rejecting), an always-right
    head (whole chains held, k+1 tokens per pass), and one wrong at varied chain positions."""
    parts, _ = reference
    want = plain_greedy(parts, PROMPT, N + 2 * depth + 2, step=4)
    s = PipelineSession(tiny_dense[0], three_workers[:n], mtp=True, progress=False, prefill_step=4)
    got, stats = spec_greedy(s.parts, PROMPT, N, step=4, backend=s, depth=depth)
    assert got == want[:N] and stats.accepted < stats.drafted
    always = OracleDrafter(PROMPT + want, parts.config.vocab_size)
    got, stats = spec_greedy(s.parts, PROMPT, N, step=4, drafter=always, backend=s, depth=depth)
    assert got == want[:N] and stats.accepted == stats.drafted
    assert stats.verify_passes <= N // (depth + 1) + 2
    mixed = OracleDrafter(PROMPT + want, parts.config.vocab_size, wrong=lambda i: i % 5 in (0, 3))
    got, stats = spec_greedy(s.parts, PROMPT, N, step=4, drafter=mixed, backend=s, depth=depth)
    assert got == want[:N] and 0 < stats.accepted < stats.drafted
    s.close()
