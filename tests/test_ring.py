"""The ring (coordinator -> workers -> coordinator over persistent links): identity and order
under mutual TLS, refused links and frames, a unit's failure kept to that unit, a worker
killed with a frame inside it."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlx.core as mx
import pytest

from mtpdist.coordinator.local_cluster import LocalCluster, LocalWorker
from mtpdist.coordinator.session import PipelineSession
from mtpdist.engine.driver import generate, run_all
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.ring import RingTransport
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.errors import WorkerCallError
from mtpdist.security import node_identity
from mtpdist.wire.activations import to_activation
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.frames import (SCHEMA, ErrorFrame, Hello, UnitFrame, decode, decode_header, encode_error,
                                 encode_header, encode_result, encode_unit, route_tag)
from mtpdist.wire.links import Link
from mtpdist.wire.sockets import SocketLink, dial
from mtpdist.wire.types import SequenceRows

from helpers import local_session

SECRET = "ring-secret-for-tests"


def channel(secret: str = SECRET, **kw) -> ChannelSettings:
    return ChannelSettings(identity=node_identity(secret), **kw)


def outcome(link_args: tuple, timeout: float = 10, port: int = 0) -> WorkerCallError | None:
    """Open a link (over `port` if given, else a gRPC stream) and return how it ended (None:
    still open after `timeout`)."""
    ended: list = []
    got = threading.Event()
    client, hello = link_args
    link = dial(client, port, hello, on_frame=lambda raw: ended.append(("frame", raw)),
                on_end=lambda e: (ended.append(e), got.set()))
    got.wait(timeout)
    link.cancel()
    return ended[0] if ended else None


def unit_now(transport, rows, hidden, timeout: float = 60):
    box, done = [], threading.Event()
    transport.send(rows, to_activation(hidden), lambda r: (box.append(r), done.set()))
    assert done.wait(timeout), "the unit never came back"
    return box[0]


def test_frames_carry_every_header_field_and_the_bytes_as_they_are():
    s = SequenceRows("seq-é", 7, 3, 2, (1, 3), "keep")
    raw, end = encode_header(s), None
    back, end = decode_header(raw, 0)
    assert back == s and end == len(raw)
    act = to_activation(mx.arange(12, dtype=mx.float32).reshape(3, 4))
    f = decode(encode_unit(UnitFrame(route_tag("r"), 9, (s,), act, (10,), (5,), (3,))))
    assert (f.unit, f.sequences, f.positions, f.compute_us, f.batch_rows) == (9, (s,), (10,), (5,), (3,))
    assert bytes(f.hidden.data) == act.data and f.hidden.shape == (3, 4)
    # A stage passes the headers on as they came: the same bytes as encoding them anew.
    raw = encode_unit(UnitFrame(route_tag("r"), 9, (s, SequenceRows("b", 1, 0)), act, (10, 1), (5,), (3,)))
    assert len(decode(raw).headers) == 2 and encode_unit(decode(raw)) == raw
    # The last stage's result frame: no sequence headers, only where each sequence now stands.
    two = (s, SequenceRows("other", 0, 1))
    r = decode(encode_result(UnitFrame(route_tag("r"), 9, two, act, (10, 1), (5, 6), (3, 3))))
    assert (r.unit, r.sequences, r.positions, r.compute_us, r.batch_rows) == (9, (), (10, 1), (5, 6), (3, 3))
    assert bytes(r.hidden.data) == act.data and r.hidden.shape == (3, 4)
    e = decode(encode_error(1, 2, 3, "conflict", "cache stands at 5"))
    assert e == ErrorFrame(1, 2, 3, "conflict", "cache stands at 5")
    with pytest.raises(Exception, match="malformed"):
        decode(encode_unit(UnitFrame(1, 1, (s,), act))[:-1])       # a byte short


@pytest.mark.parametrize("links", ["socket", "grpc"])
def test_sixteen_streams_over_the_ring_with_mtls_identical_and_in_order(tmp_path, tiny_dense, links):
    local = local_session(tiny_dense[0], prefill_step=8)
    prompts = [[5 + i, 17, 99, 3 * i + 1, 42][: 1 + i % 5] for i in range(16)]
    reqs = [GenerationRequest(tuple(p), 12, mtp=i % 2 == 0, mtp_depth=1 + i % 3) for i, p in enumerate(prompts)]
    want = [generate(Scheduler(local.generator, local, SchedulerSettings(reuse_prefixes=False)),
                     GenerationRequest(r.prompt_ids, r.max_tokens)).token_ids for r in reqs]
    with LocalCluster(3, tmp_path, *(("--grpc-links",) if links == "grpc" else ()), token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, mtp=True, prefill_step=8, progress=False,
                            channel=channel(step_timeout=30))
        try:
            ring = s.transport()
            assert isinstance(ring, RingTransport)
            assert isinstance(ring.sink, SocketLink if links == "socket" else Link)
            sched = Scheduler(s.generator, s, SchedulerSettings(prefill_budget=8, reuse_prefixes=False))
            got = [k.wait().token_ids for k in run_all(sched, reqs, timeout=300)]
            assert got == want
            assert sched.stats["max_unit_sequences"] >= 4           # several sequences in one frame
        finally:
            s.close()


@pytest.mark.parametrize("links", ["socket", "grpc"])
def test_links_off_the_plan_are_refused_and_a_bad_unit_fails_alone(tmp_path, tiny_dense, links):
    with LocalCluster(2, tmp_path, token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel())
        first, last = (WorkerClient(a, channel()) for a in ws.addresses)
        p0, p1 = (c.describe().link_port for c in (first, last)) if links == "socket" else (0, 0)
        try:
            ring = s.transport()
            h = mx.zeros((2, 64))
            ok = unit_now(ring, [SequenceRows("a", 0, 2)], h)
            assert ok.positions == (2,) and ok.array().shape == (2, 64) and len(ok.compute_us) == 2
            # A unit out of order (its cache is not where it says) fails alone, named by worker.
            bad = unit_now(ring, [SequenceRows("a", 5, 2)], h)
            assert isinstance(bad, WorkerCallError) and bad.kind == "conflict" and bad.address == ws.addresses[0]
            assert unit_now(ring, [SequenceRows("a", 2, 2)], h).positions == (4,)   # the ring carries on
            # Only the planned predecessor may feed a stage; only the last stage has a sink; only this plan's route.
            e = outcome((last, Hello(s.route, "feed", "127.0.0.1:1", last.address, 1)), port=p1)
            assert e.code == "PERMISSION_DENIED" and "planned predecessor" in e.details
            e = outcome((last, Hello(s.route, "feed", "", last.address, 1)), port=p1)  # "the coordinator", not first
            assert e.code == "PERMISSION_DENIED"
            assert outcome((first, Hello(s.route, "sink", "", first.address, 0)), port=p0).code == "PERMISSION_DENIED"
            e = outcome((first, Hello("an-old-plan", "feed", "", first.address, 0)), port=p0)
            assert e.code == "FAILED_PRECONDITION"
            e = outcome((first, Hello(s.route, "feed", "", first.address, 0, "0bad0bad")), port=p0)
            assert e.code == "FAILED_PRECONDITION" and SCHEMA in e.details         # another header schema
            # A frame of another route on a planned link closes that link (a socket link: the
            # dialer finds it closed when it writes again).
            ended: list = []
            link = dial(first, p0, Hello(s.route, "feed", "", first.address, 0), on_end=ended.append)
            bad = encode_unit(UnitFrame(route_tag("an-old-plan"), 1, (SequenceRows("b", 0, 2),), to_activation(h)))
            deadline = time.time() + 10
            while not ended and time.time() < deadline:
                link.send(bad)
                time.sleep(0.1)
            assert ended
            if links == "grpc":
                assert ended[0].code == "FAILED_PRECONDITION" and "another route" in ended[0].details
            link.cancel()
        finally:
            first.close(), last.close()
            s.close()


@pytest.mark.parametrize("links", ["socket", "grpc"])
@pytest.mark.parametrize("who", ["no secret", "another secret"])
def test_a_link_without_the_cluster_secret_gets_nothing(tmp_path, tiny_dense, who, links):
    with LocalCluster(1, tmp_path, token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel())
        port = WorkerClient(ws.addresses[0], channel()).describe().link_port if links == "socket" else 0
        stranger = WorkerClient(ws.addresses[0], ChannelSettings() if who == "no secret" else channel("guess"))
        try:
            # Even with the plan's route id: no handshake, no link, no frame.
            e = outcome((stranger, Hello(s.route, "sink", "", stranger.address, 0)), port=port)
            assert isinstance(e, WorkerCallError) and e.code == "UNAVAILABLE"
        finally:
            stranger.close()
            s.close()


def test_a_worker_killed_with_a_frame_inside_is_named_as_lost(tmp_path, tiny_dense):
    ws = [LocalWorker(tmp_path / "w0", token=SECRET),
          LocalWorker(tmp_path / "w1", "--emulate-ms", "3000,0", token=SECRET),  # the frame stays here
          LocalWorker(tmp_path / "w2", token=SECRET)]
    try:
        s = PipelineSession(tiny_dense[0], [w.address for w in ws], progress=False, channel=channel(step_timeout=30))
        ring = s.transport()
        threading.Timer(1.0, lambda: os.kill(ws[1].proc.pid, signal.SIGKILL)).start()
        t0 = time.time()
        err = unit_now(ring, [SequenceRows("a", 0, 1)], mx.zeros((1, 64)))
        assert isinstance(err, WorkerCallError) and err.recoverable and err.address == ws[1].address, err
        assert time.time() - t0 < 15                  # by the link's end, not a deadline
        again = unit_now(ring, [SequenceRows("b", 0, 1)], mx.zeros((1, 64)), timeout=5)
        assert isinstance(again, WorkerCallError) and again.recoverable   # at once: the scheduler re-plans
        s.close()
    finally:
        for w in ws:
            w.stop()


def test_a_loaded_shard_is_warmed_and_keeps_no_warm_up_state(tiny_dense):
    from mtpdist.model.loader import load_parts
    from mtpdist.worker.sequences import SequenceStore
    from mtpdist.worker.warm import BATCHES, STEP_ROWS, warm

    parts = load_parts(tiny_dense[0], layers=(0, 2), head=False)
    store = SequenceStore(parts.stack, parts.config.hidden_size)
    ran = []
    forward = store.forward
    store.forward = lambda rows, x: (ran.append(tuple(r.tokens for r in rows)), forward(rows, x))[1]
    warm(store)
    assert {(r,) * n for n in BATCHES for r in STEP_ROWS} <= set(ran)    # decode and verify shapes, batched
    assert not store.seqs and not store.last_used                          # nothing left behind


@pytest.mark.parametrize("secure", [True, False])
def test_a_wiretap_on_a_socket_link_sees_no_activations_with_mtls(tmp_path, tiny_dense, secure):
    import numpy as np
    from test_security import Relay

    with LocalCluster(1, tmp_path, token=SECRET if secure else None) as ws:
        settings = channel() if secure else ChannelSettings()
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=settings)
        c = WorkerClient(ws.addresses[0], settings)
        try:
            tap = Relay(f"127.0.0.1:{c.describe().link_port}")
            h = mx.full((2, 64), 1234.5678)
            link = dial(c, int(tap.address.rsplit(":", 1)[1]), Hello(s.route, "feed", "", c.address, 0))
            link.send(encode_unit(UnitFrame(route_tag(s.route), 1, (SequenceRows("t", 0, 2),), to_activation(h))))
            time.sleep(1.0)
            pattern = np.full(8, 1234.5678, np.float32).tobytes()
            assert len(tap.seen) > 200                             # the frame went through the tap
            assert (pattern in tap.seen) is not secure and (s.route.encode() in tap.seen) is not secure
            link.cancel()
        finally:
            c.close()
            s.close()


def test_a_link_refused_between_two_live_workers_reaches_the_coordinator(tmp_path, tiny_dense):
    """Worker 2 no longer takes worker 1 for its predecessor (as after a re-plan elsewhere): worker
    1's link to it is refused, worker 1 ends its own feed, and the coordinator hears of it at
    once instead of waiting for a unit that went nowhere."""
    with LocalCluster(2, tmp_path, token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel(step_timeout=60))
        second = WorkerClient(ws.addresses[1], channel())
        try:
            start, end = s.placement.ranges[1]
            second.load_shard(s._spec(start, end, (), upstream="127.0.0.1:1", route=s.route))
            ring = s.transport()
            t0 = time.time()
            err = unit_now(ring, [SequenceRows("a", 0, 1)], mx.zeros((1, 64)), timeout=20)
            assert isinstance(err, WorkerCallError) and err.recoverable and time.time() - t0 < 10
            assert err.address == ws.addresses[0] and "ring broke" in str(err)
        finally:
            second.close()
            s.close()


def test_the_compute_thread_reads_its_own_link_in_order_big_frames_too():
    """A socket feed is read by the MLX thread itself: frames reach it in the order sent (a big
    one, read off that thread, is not overtaken by the small ones behind it), control calls are
    still answered while the link is idle, and a refused frame or the stream's end ends the link."""
    import socket

    from mtpdist.errors import RequestError
    from mtpdist.wire.sockets import Inlet, write_frame
    from mtpdist.worker.compute import BIG_FRAME, ComputeLoop

    loop = ComputeLoop()
    mine, theirs = socket.socketpair()
    ended, got, threads = threading.Event(), [], set()

    def on_frame(raw):
        threads.add(threading.current_thread().name)
        if bytes(raw[:4]) == b"bad!":
            raise RequestError("invalid", "a frame this link must not carry")
        got.append(bytes(raw[:8]))

    loop.add_inlet(Inlet(mine, ended), on_frame)
    assert loop.call(lambda: threading.current_thread().name) == "mlx"   # answered with the link idle
    sizes = [16, BIG_FRAME + 4096, 16, 64, BIG_FRAME * 2, 8]
    sent = [i.to_bytes(8, "little") for i in range(len(sizes))]
    for head, n in zip(sent, sizes):
        write_frame(theirs, head + bytes(n - 8))
    deadline = time.time() + 20
    while len(got) < len(sent) and time.time() < deadline:
        time.sleep(0.01)
    assert got == sent                       # every frame, in order
    assert "mlx" in threads and "link-big" in threads
    assert loop.call(lambda: 41 + 1) == 42
    write_frame(theirs, b"bad!" + bytes(12))
    assert ended.wait(10)                    # a refused frame ends the link
    theirs.close()

    mine2, theirs2 = socket.socketpair()
    ended2 = threading.Event()
    loop.add_inlet(Inlet(mine2, ended2), on_frame)
    theirs2.close()
    assert ended2.wait(10) and not loop.inlets   # the stream's end: handed back, nothing left polled


def test_the_frame_reader_returns_each_frame_whole_however_the_bytes_arrive():
    """Frames that come in one burst, frames dribbled a few bytes at a time, and frames that
    straddle or exceed the receive buffer all come out whole and in order."""
    import random
    import socket

    from mtpdist.wire.sockets import _BUFFER, FrameReader, _LEN

    rng = random.Random(7)
    sizes = [1, 5, 300, _BUFFER - 4, _BUFFER - 3, 17, _BUFFER, _BUFFER + 1, 3 * _BUFFER + 11, 2, 40_000, 40_000]
    frames = [rng.randbytes(n) for n in sizes]
    stream = b"".join(_LEN.pack(len(f)) + f for f in frames)
    for chunk in (len(stream), 7, 4093):        # one burst; dribbled; odd pieces
        mine, theirs = socket.socketpair()

        def write():
            for i in range(0, len(stream), chunk):
                theirs.sendall(stream[i:i + chunk])
            theirs.close()
        threading.Thread(target=write, daemon=True).start()
        reader = FrameReader(mine)
        got = []
        while (f := reader.read_frame()) is not None:
            got.append(bytes(f))
        assert got == frames, f"chunks of {chunk}"
        mine.close()


def test_a_batch_is_split_into_views_of_one_evaluated_buffer():
    from mtpdist.wire.activations import from_activation, split_activation, wire_bits

    x = mx.random.normal((6, 8)).astype(mx.bfloat16)
    bits = wire_bits(x)
    mx.eval(bits)
    parts = split_activation(x, bits, (1, 3, 2))
    assert [p.shape for p in parts] == [(1, 8), (3, 8), (2, 8)]
    assert all(isinstance(p.data, memoryview) for p in parts)
    back = mx.concatenate([from_activation(p) for p in parts], axis=0)
    assert mx.array_equal(back, x).item()
    assert bytes(to_activation(x[1:4]).data) == bytes(parts[1].data)
