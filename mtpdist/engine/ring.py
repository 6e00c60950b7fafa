"""Units over the plan's ring: coordinator -> worker 1 -> ... -> worker N -> coordinator.

Two persistent links per plan (TLS sockets, mtpdist/wire/sockets.py, or gRPC streams,
mtpdist/wire/links.py, for a worker that offers no link port): a feed to the first worker,
and a sink to the last one over which finished units come back; between workers, each
stage's own feed link to the next. `send` encodes one frame (header and activation bytes) and returns; the
result arrives on the sink's reader thread as a `done` event. Liveness, deadlines, keeping
and forking are the chain's (WorkerTransport): only the way units travel differs.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import WorkerCallError
from ..wire.errors import worker_error
from ..wire.frames import ErrorFrame, Hello, UnitFrame, decode, encode_unit, route_tag
from ..wire.links import unit_error
from ..wire.sockets import dial
from .transport import UnitResult, WorkerTransport

log = logging.getLogger("mtpdist.engine")


class _Abandon:
    """What the liveness watchdog cancels for a unit in flight: fails it with the reason given."""

    def __init__(self, ring: "RingTransport", uid: int):
        self.ring, self.uid = ring, uid

    def cancel(self) -> None:
        with self.ring.lock:
            err = self.ring.lost.pop(self.uid, None)
        self.ring._finish(self.uid, err or worker_error(self.ring.clients[0].address, "CANCELLED", "abandoned"))


class RingTransport(WorkerTransport):
    """The workers of one plan as a one-way ring (`route`: the plan's id, told to each worker
    with its shard; links of any other plan are refused)."""

    def __init__(self, clients, step_timeout: float = 5.0, hard_timeout: float = 900.0, route: str = "",
                 link_ports: tuple[int, ...] = ()):
        """`link_ports`: each worker's socket link port from Describe (0 or none: gRPC stream links)."""
        super().__init__(clients, step_timeout, hard_timeout)
        self.route, self.tag = route, route_tag(route)
        self.waiting: dict[int, object] = {}
        self.broken: WorkerCallError | None = None
        self.closing = False
        last, first = self.clients[-1], self.clients[0]
        # The sink first, so that the last stage's first output finds it waiting.
        ports = tuple(link_ports) or (0,) * self.stages
        self.sink = dial(last, ports[-1], Hello(route, "sink", "", last.address, self.stages - 1), self._arrived,
                         self._ended)
        self.feed = dial(first, ports[0], Hello(route, "feed", "", first.address, 0), None, self._ended)

    def send(self, rows, hidden, done) -> None:
        self.sent_bytes += (self.stages + 1) * len(hidden.data)
        with self.lock:
            broken = self.broken
            if broken is None:
                uid, self.units = self.units, self.units + 1
                self.inflight[uid] = (time.monotonic(), _Abandon(self, uid))
                self.waiting[uid] = done
        if broken is not None:
            done(broken)     # at once: the scheduler re-plans
            return
        self.feed.send(encode_unit(UnitFrame(self.tag, uid, tuple(rows), hidden)))

    def _finish(self, uid: int, result) -> None:
        with self.lock:
            self.inflight.pop(uid, None)
            done = self.waiting.pop(uid, None)
        if done is not None:     # else: abandoned earlier, a late arrival
            done(result)

    def _arrived(self, raw: bytes) -> None:
        """A finished (or failed) unit from the last stage, on the sink's reader thread."""
        try:
            f = decode(raw)
        except Exception as e:
            self._ended(worker_error(self.clients[-1].address, "DATA_LOSS", f"an unreadable frame came back: {e}"))
            return
        if f.route != self.tag:
            return
        if isinstance(f, ErrorFrame):
            address = self.clients[f.stage].address if 0 <= f.stage < self.stages else self.clients[-1].address
            self._finish(f.unit, unit_error(address, f.kind, f.details))
        else:
            self._finish(f.unit, UnitResult(f.hidden, f.positions, f.compute_us, f.batch_rows))

    def _ended(self, err: WorkerCallError) -> None:
        """A link of the ring ended: name the worker that is gone (or whose link broke) and fail
        every unit in flight with it; later sends fail at once, so the scheduler re-plans."""
        if self.closing:
            return

        def name_and_fail():
            try:
                silent = None if self.closing else self._silent_worker()
            except ValueError:   # the plan's channels were closed under us: a re-plan, not a failure
                return
            if silent is not None:
                why = worker_error(silent, "UNAVAILABLE", f"no answer to a liveness probe within "
                                                          f"{self.step_timeout:g} s after the ring broke ({err.details})")
            else:
                why = WorkerCallError(err.address, err.kind, err.code, f"the ring broke: {err.details}")
            with self.lock:
                if self.broken is not None or self.closing:
                    return
                self.broken = why
                uids = list(self.waiting)
            log.warning("%s", why)
            for uid in uids:
                self._finish(uid, why)
        threading.Thread(target=name_and_fail, name="mtpdist-ring-broke", daemon=True).start()

    def close(self) -> None:
        self.closing = True
        self.feed.close()
        self.sink.cancel()
        super().close()
