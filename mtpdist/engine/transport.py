"""Where the scheduler's units run: the plan's workers (units go round their ring,
mtpdist/engine/ring.py), or, through the same protocol, a worker's store in this process
(worker/in_process.py).

`send` starts a unit and returns at once; `done(result)` is called later (on any thread)
with a `UnitResult` or the exception. Keeping and forking kept states are asynchronous too,
so the thread that owns MLX never waits on the network.

A worker that is busy is not a lost worker: a unit has no short deadline. Instead, while
a unit is out for longer than `ChannelSettings.step_timeout`, every worker of the chain is
asked whether it is alive (Health, answered off the worker's compute thread); a worker
that does not answer in time is declared lost and the units in flight fail with its name.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import mlx.core as mx

from ..errors import WorkerCallError
from ..wire.activations import from_activation
from ..wire.client import WorkerClient
from ..wire.errors import worker_error
from ..wire.types import Activation, SequenceRows

log = logging.getLogger("mtpdist.engine")


@dataclass(frozen=True)
class UnitResult:
    """The last stage's rows of a unit, with per-stage compute time and batch sizes."""
    hidden: Activation | mx.array
    positions: tuple[int, ...]
    compute_us: tuple[int, ...] = ()
    batch_rows: tuple[int, ...] = ()

    def array(self) -> mx.array:
        """The rows as an mx.array [N, H] (call on the MLX thread)."""
        return self.hidden if isinstance(self.hidden, mx.array) else from_activation(self.hidden)


Done = Callable[[object], None]


class Transport(Protocol):
    """Runs units of several sequences' rows through the backbone layers."""
    stages: int
    def send(self, rows: Sequence[SequenceRows], hidden: Activation, done: Done) -> None:
        """Start a unit: `hidden` holds its input rows in `rows`' order."""
    def release(self, sequence_ids: Sequence[str]) -> None: ...
    def keep_async(self, sequence_id: str, length: int, name: str, done: Callable[[int | None], None]) -> None: ...
    def fork_async(self, prefix: str, sequence_id: str, done: Callable[[int | None], None]) -> None: ...
    def close(self) -> None: ...


class WorkerTransport:
    """The control plane of a plan's workers: liveness while units are out, release, keep and
    fork. Units themselves travel the ring (RingTransport's `send`); the unary Forward chain
    that this class once drove is gone from the coordinator."""

    def __init__(self, clients: Sequence[WorkerClient], step_timeout: float = 5.0, hard_timeout: float = 900.0):
        """`step_timeout`: how long a worker may leave a liveness probe unanswered; `hard_timeout`:
        the most one unit may take however alive its workers say they are."""
        self.clients = list(clients)
        self.stages = len(self.clients)
        self.step_timeout, self.hard_timeout = step_timeout, hard_timeout
        self.sent_bytes = 0
        self.pool = ThreadPoolExecutor(max(2, self.stages), thread_name_prefix="mtpdist-control")
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[float, object]] = {}   # unit -> (sent at, what cancels it)
        self.lost: dict[int, WorkerCallError] = {}              # units abandoned, and why
        self.units = 0
        self.closed = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="mtpdist-liveness", daemon=True)
        self.watchdog.start()

    def _watch(self) -> None:
        """Probe the chain while a unit is out longer than a step may take; fail the units if a
        worker does not answer."""
        while not self.closed.wait(min(1.0, self.step_timeout / 2)):
            with self.lock:
                oldest = min((t for t, _ in self.inflight.values()), default=None)
            if oldest is None or time.monotonic() - oldest < self.step_timeout:
                continue
            silent = self._silent_worker()
            if silent is None:
                continue
            err = worker_error(silent, "UNAVAILABLE", f"no answer to a liveness probe within "
                                                      f"{self.step_timeout:g} s (stopped, hung or unreachable)")
            log.warning("%s", err)
            with self.lock:
                abandon = [(uid, f) for uid, (_, f) in self.inflight.items() if f is not None]
                for uid, _ in abandon:
                    self.lost[uid] = err
            for _, f in abandon:
                f.cancel()

    def _silent_worker(self) -> str | None:
        """The first worker of the chain that does not answer Health within the step timeout."""
        def probe(c: WorkerClient) -> bool:
            try:
                c.health(timeout=self.step_timeout)
                return True
            except WorkerCallError:
                return False
        answers = list(self.pool.map(probe, self.clients))
        return next((c.address for c, ok in zip(self.clients, answers) if not ok), None)

    def release(self, sequence_ids) -> None:
        """Fire and forget, with a short deadline: a stalled worker must not hold anyone up."""
        for c in self.clients:
            for s in sequence_ids:
                c.release_nowait(s)

    def keep_async(self, sequence_id, length, name, done) -> None:
        """Every worker keeps the sequence's state under `name`; `done(length)`, or None if any could not."""
        def run():
            lengths = set()
            for c in self.clients:
                try:
                    lengths.add(c.keep(sequence_id, length, name))
                except WorkerCallError:
                    c.release_nowait(sequence_id)
                    return None
            return lengths.pop() if len(lengths) == 1 else None
        self._later(run, done)

    def fork_async(self, prefix, sequence_id, done) -> None:
        """Start `sequence_id` from `prefix` on every worker; `done(length)`, or None (and nothing
        left behind) if any lacks it."""
        def run():
            lengths = set()
            for i, c in enumerate(self.clients):
                try:
                    lengths.add(c.fork(prefix, sequence_id))
                except WorkerCallError:
                    for earlier in self.clients[:i]:
                        earlier.release_nowait(sequence_id)
                    return None
            return lengths.pop() if len(lengths) == 1 else None
        self._later(run, done)

    def _later(self, fn, done) -> None:
        fut = self.pool.submit(fn)
        fut.add_done_callback(lambda f: done(f.result() if f.exception() is None else None))

    def close(self) -> None:
        self.closed.set()
        self.pool.shutdown(wait=False)
