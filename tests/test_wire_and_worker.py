"""gRPC keepalive without GOAWAY, one worker per port, per-port ids and memory offers, idle-sequence
expiry, fire-and-forget releases, and the classification of worker failures."""

from __future__ import annotations

import pytest

import subprocess
import sys
import textwrap

KEEPALIVE_SCRIPT = textwrap.dedent("""
    import sys, tempfile, time
    from pathlib import Path
    from mtpdist.wire.client import ChannelSettings, WorkerClient
    from mtpdist.wire.server import serve
    from mtpdist.worker.service import WorkerService
    server, port = serve(WorkerService(Path(tempfile.mkdtemp())), "127.0.0.1", 0, keepalive_ms=200)
    client = WorkerClient(f"127.0.0.1:{port}", ChannelSettings(keepalive_ms=200))
    print(client.health(), flush=True)
    time.sleep(5)  # idle: the client pings (gRPC spaces them >= 1 s apart), more than 2 ping intervals
    print(client.health(), flush=True)
""")


def test_idle_connection_keepalive_pings_are_accepted():
    p = subprocess.run([sys.executable, "-c", KEEPALIVE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["idle", "idle"]
    assert "GOAWAY" not in p.stderr and "too_many_pings" not in p.stderr, p.stderr[-2000:]


# -- worker failures: lost worker (recover) or deterministic failure (report once) ----------------

def test_worker_failure_classification():
    from mtpdist.wire.errors import kind_of
    lost = [("UNAVAILABLE", "failed to connect to all addresses"), ("DEADLINE_EXCEEDED", "Deadline Exceeded"),
            ("NOT_FOUND", "unknown or released sequence 'ab' (a new sequence starts at 0)"),
            ("NOT_FOUND", "no shard loaded; the coordinator must call LoadShard first"),
            ("NOT_FOUND", "sequence 'ab' was evicted (idle for more than 600 s); start it again"),
            ("CANCELLED", "Cancelled"), ("INTERNAL", "Received RST_STREAM with error code 2")]
    deterministic = [("UNKNOWN", "Exception calling application: [matmul] shapes (1,64) and (32,64) differ"),
                     ("INVALID_ARGUMENT", "snapshot positions [9] must lie in [1, 3]"),
                     ("FAILED_PRECONDITION", "sequence 'ab': cache stands at 5, request expects 7"),
                     ("RESOURCE_EXHAUSTED", "Received message larger than max (90000000 vs. 67108864)"),
                     ("INTERNAL", "Exception deserializing request!"), ("UNAUTHENTICATED", "bad token")]
    assert all(kind_of(c, d) in ("lost", "state_lost") for c, d in lost)
    assert not any(kind_of(c, d) in ("lost", "state_lost") for c, d in deterministic)


@pytest.mark.parametrize("failure", ["compute", "position"])
def test_deterministic_failure_is_reported_once_without_replanning(tmp_path, tiny_dense, failure):
    """A compute error, or a coordinator-side position bug (the worker's cache is not where the
    request says), fails its request once through the scheduler: no re-plan, no replay."""
    from mtpdist.engine.driver import generate
    from mtpdist.engine.generate import GenerationRequest, Generator
    from mtpdist.engine.scheduler import Scheduler
    from mtpdist.engine.ring import RingTransport
    from mtpdist.errors import MtpdistError, RequestError
    from mtpdist.model.loader import load_parts
    from mtpdist.wire.client import WorkerClient
    from mtpdist.wire.server import serve
    from mtpdist.worker.service import WorkerService

    class Broken(WorkerService):  # a worker that fails the same way every time
        def forward_async(self, call, done):
            if failure == "position":
                raise RequestError("conflict", "sequence 'x': cache stands at 5, request expects 7")
            raise RuntimeError("[matmul] shapes (1,64) and (32,64) differ")

    class Backend:  # counts re-plans
        recovers = 0

        def transport(self):
            return transport

        def prepare(self):
            pass

        def recover(self):
            Backend.recovers += 1

    server, port = serve(Broken(tmp_path), "127.0.0.1", 0)
    client = WorkerClient(f"127.0.0.1:{port}")
    transport = RingTransport([client])
    parts = load_parts(tiny_dense[0], layers=(0, 0), head=True)
    try:
        with pytest.raises(MtpdistError) as e:
            generate(Scheduler(Generator(parts, None), Backend()), GenerationRequest((1, 2, 3), 4), timeout=60)
        want = "cache stands at 5" if failure == "position" else "shapes (1,64)"
        assert want in str(e.value) and Backend.recovers == 0
    finally:
        client.close()
        server.stop(None)


# -- releases never wait on a stalled worker; orphaned sequences expire ----------------------------

def test_release_to_a_stalled_worker_returns_at_once(tmp_path):
    import os
    import signal
    import time

    from mtpdist.coordinator.local_cluster import LocalWorker
    from mtpdist.engine.transport import WorkerTransport
    from mtpdist.wire.client import WorkerClient

    w = LocalWorker(tmp_path / "w")
    try:
        client = WorkerClient(w.address)  # default 30 s deadline for ordinary calls
        assert client.health() == "idle"
        os.kill(w.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        WorkerTransport([client]).release(["some-sequence"])
        assert time.monotonic() - t0 < 2.0
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
        w.stop()


def _worker_cli(cache, *args):
    import os
    env = dict(os.environ, MTPDIST_CACHE=str(cache), MTPDIST_CONFIG=str(cache / "config"))
    return subprocess.run([sys.executable, "-m", "mtpdist.cli", "worker", "--host", "127.0.0.1", "--insecure",
                           "--no-advertise", *args], capture_output=True, text=True, timeout=60, env=env)


def test_one_worker_per_port_own_ids_and_shared_memory_budget(tmp_path):
    from mtpdist.coordinator.local_cluster import LocalWorker
    from mtpdist.wire.client import WorkerClient
    from mtpdist.worker.service import total_memory

    from servers import free_port

    shared = tmp_path / "host"  # both workers use this machine's one config folder
    port = free_port()
    a = LocalWorker(shared, "--port", str(port), "--usable-memory-gb", "2")
    b = LocalWorker(shared)
    try:
        p = _worker_cli(shared, "--port", str(port))            # the same port again
        assert p.returncode == 2 and "in use" in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        ia, ib = WorkerClient(a.address).describe(), WorkerClient(b.address).describe()
        assert ia.worker_id != ib.worker_id and ia.worker_id.endswith(f"-{port}")
        assert ia.usable_bytes == 2 << 30
        # Its own share; placement makes workers of one machine share it (tests/test_host_memory.py).
        assert ib.usable_bytes == int(total_memory() * 0.75)
        assert ia.host_id == ib.host_id != "" and ia.memory_bytes == ib.memory_bytes == total_memory()
        a.stop()
        a = LocalWorker(shared, "--port", str(port), "--usable-memory-gb", "2")
        assert WorkerClient(a.address).describe().worker_id == ia.worker_id  # stable per port
    finally:
        a.stop()
        b.stop()


def test_sequences_orphaned_by_a_crashed_coordinator_expire(tmp_path, tiny_dense):
    import os
    import signal
    import time

    import httpx

    from mtpdist.coordinator.local_cluster import LocalWorker
    from mtpdist.wire.client import WorkerClient

    from servers import Coordinator

    w = LocalWorker(tmp_path / "w", "--sequence-ttl", "2")
    c = Coordinator("--model", str(tiny_dense[0]), "--insecure", "--worker", w.address)
    try:
        with httpx.stream("POST", c.url + "/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 3000, "temperature": 0, "stream": True}) as r:
            next(ln for ln in r.iter_lines() if ln.startswith("data:"))
            os.kill(c.proc.pid, signal.SIGKILL)                 # no Release will ever come
        assert WorkerClient(w.address).describe().sequences == 1
        deadline = time.time() + 15
        while time.time() < deadline and WorkerClient(w.address).describe().sequences:
            time.sleep(0.25)
        assert WorkerClient(w.address).describe().sequences == 0
    finally:
        c.stop()
        w.stop()


def test_stage_expire_idle_drops_only_idle_sequences(tiny_dense):
    import time

    import mlx.core as mx
    import pytest

    from mtpdist.worker.sequences import SequenceStore
    from mtpdist.wire.types import SequenceRows
    from mtpdist.errors import RequestError
    from mtpdist.model.loader import load_parts

    parts = load_parts(tiny_dense[0], layers=(0, 2), head=False)
    hidden = parts.config.hidden_size
    stage = SequenceStore(parts.stack, hidden)
    x = mx.ones((3, hidden))

    def rows(seq, position):
        return [SequenceRows(seq, position, 3)]
    stage.forward(rows("old", 0), x)
    stage.forward(rows("new", 0), x)
    stage.last_used["old"] -= 100                       # "old" last used 100 s ago
    assert stage.expire_idle(time.monotonic(), ttl=60) == ["old"]
    assert list(stage.seqs) == ["new"] and stage.expire_idle(time.monotonic(), ttl=60) == []
    with pytest.raises(RequestError) as e:
        stage.forward(rows("old", 3), x)
    assert e.value.kind == "state_lost" and "idle for more than 60 s" in str(e.value)  # replayed afresh
    assert stage.forward(rows("new", 3), x).positions == [6]   # the live one is untouched


def test_store_expires_only_unused_prefixes(tiny_dense):
    import time

    import mlx.core as mx

    from mtpdist.worker.sequences import SequenceStore
    from mtpdist.model.loader import load_parts
    from mtpdist.wire.types import SequenceRows

    parts = load_parts(tiny_dense[0], layers=(0, 2), head=False)
    stage = SequenceStore(parts.stack, parts.config.hidden_size)
    x = mx.ones((3, parts.config.hidden_size))
    for seq in ("a", "b"):
        stage.forward([SequenceRows(seq, 0, 3)], x)
        stage.keep(seq, 3, f"{seq}:turn")
    stage.prefix_used["a:turn"] -= 100                    # kept 100 s ago and never forked since
    assert stage.expire_prefixes(time.monotonic(), ttl=60) == ["a:turn"]
    assert list(stage.prefixes) == ["b:turn"] and stage.prefix_bytes == sum(c.nbytes() for c in stage.prefixes["b:turn"])
    stage.prefix_used["b:turn"] -= 100
    stage.fork("b:turn", "c")                             # a fork counts as a use
    assert stage.expire_prefixes(time.monotonic(), ttl=60) == [] and stage.prefixes


def test_store_keeps_its_state_budget_within_a_bounded_number_of_rows(tiny_dense):
    import mlx.core as mx

    from mtpdist.errors import RequestError
    from mtpdist.model.loader import load_parts
    from mtpdist.wire.types import SequenceRows
    from mtpdist.worker.sequences import BUDGET_CHECK_ROWS, SequenceStore

    parts = load_parts(tiny_dense[0], layers=(0, 2), head=False)
    stage = SequenceStore(parts.stack, parts.config.hidden_size)
    one = mx.ones((1, parts.config.hidden_size))
    stage.forward([SequenceRows("idle", 0, 1)], one)
    stage.forward([SequenceRows("busy", 0, 1)], one)
    stage.state_budget = stage.state_bytes()        # from here on, every new cache entry is over it
    steps = 0
    while "idle" in stage.seqs:
        stage.forward([SequenceRows("busy", 1 + steps, 1)], one)
        stage.tidy()                                # as the compute loop does once the output has gone
        steps += 1
        assert steps <= BUDGET_CHECK_ROWS, "the budget was never checked"
    # Scanning every cache for the budget after each decode step costs a pass over every layer of
    # every sequence; it runs once the rows since the last scan (the two above count) reach the bound.
    assert 1 < steps <= BUDGET_CHECK_ROWS and list(stage.seqs) == ["busy"]
    with pytest.raises(RequestError) as e:
        stage.forward([SequenceRows("idle", 1, 1)], one)
    assert e.value.kind == "state_lost" and "memory ran short" in str(e.value)


def test_the_compute_loop_frees_old_snapshots_after_each_forward(tiny_dense):
    import mlx.core as mx

    from mtpdist.model.loader import load_parts
    from mtpdist.wire.activations import to_activation
    from mtpdist.wire.types import ForwardCall, SequenceRows
    from mtpdist.worker.compute import ComputeLoop
    from mtpdist.worker.sequences import SequenceStore

    parts = load_parts(tiny_dense[0], layers=(0, 4), head=False)
    stage = SequenceStore(parts.stack, parts.config.hidden_size)
    loop = ComputeLoop()
    x = to_activation(mx.ones((2, parts.config.hidden_size)))
    for step in range(6):            # verify-sized steps, each with a snapshot after its first row
        p = 2 * step
        loop.forward(stage, ForwardCall((SequenceRows("s", p, 2, 0, (1,), "", p),), x))
    gdn = [c for c in stage.seqs["s"].caches if hasattr(c, "snapshots")]
    # The loop tidies after each forward: only snapshots at or above the last floor are left.
    assert gdn and all(min(c.snapshots) >= 10 for c in gdn) and not stage.untidy
