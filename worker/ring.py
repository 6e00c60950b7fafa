"""A worker's place in the plan's ring: which links it accepts, and where its output goes.

Stage k takes units from a feed link opened by its planned predecessor (the coordinator for
the first stage): the MLX thread reads a socket link's frames itself (a gRPC link's come from
its thread), queues their rows, and puts each output frame on the next stage's feed link, or,
at the last stage, writes it on the sink link the coordinator opened to it. Nobody waits on a downstream call. A unit that fails here goes
on down the ring as an error frame naming this stage, so the coordinator fails that unit
alone. When a feed link ends, this stage closes its own outlet: the end travels down the
ring to the coordinator, which then names the worker that is gone (liveness probes).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict

from mtpdist.errors import RequestError
from mtpdist.wire.frames import (SCHEMA, ErrorFrame, Hello, UnitFrame, decode, encode_error, encode_result,
                                 encode_unit, route_tag)
from mtpdist.errors import WorkerCallError
from mtpdist.wire.sockets import dial
from mtpdist.wire.types import ForwardCall

log = logging.getLogger("mtpdist.worker")
_END = object()


class _Sink:
    """The last stage's outlet: frames wait here for the coordinator's sink link, or, once a
    socket link is attached, are written by the thread that made them (no writer thread to wake)."""

    def __init__(self):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()     # one writer at a time, and none after close
        self.write = None
        self.ended = threading.Event()

    def send(self, frame: bytes) -> None:
        with self.lock:
            if self.write is None:
                self.q.put(frame)
                return
            try:
                self.write(frame)
            except OSError as e:          # the coordinator went away: its link ends
                log.warning("the sink link broke: %s", e)
                self.write = None
                self.ended.set()

    def attach(self, write) -> threading.Event:
        """A socket link's writer: frames that waited go first, later ones are written on send.
        The event is set when the sink ends."""
        with self.lock:
            while not self.ended.is_set() and not self.q.empty():
                f = self.q.get()
                if f is _END:
                    self.ended.set()
                    break
                write(f)
            if not self.ended.is_set():
                self.write = write
        return self.ended

    def outgoing(self):
        while (f := self.q.get()) is not _END:
            yield f

    def close(self) -> None:
        with self.lock:
            self.write = None
            self.ended.set()
        self.q.put(_END)

    def frame(self, raw: bytes) -> None:
        raise RequestError("invalid", "a sink link carries no frames to the worker")


class _Feed:
    """One feed link into this stage: run each frame, pass the result on."""

    def __init__(self, ring: "RingStage", hello: Hello):
        self.ring, self.stage, self.outlet = ring, hello.stage, None
        self.tag = route_tag(hello.route)
        self.last = False                          # the last stage: results go back without headers
        self.dead: WorkerCallError | None = None   # our outlet's end: units would go nowhere
        self.abort = None                          # set by the link's server

    def broken(self, err: WorkerCallError) -> None:
        """The link to the next stage ended: end ours too, so that the break travels back up to
        the coordinator (and down: the next stage's feed ended with it)."""
        log.warning("the link to the next stage ended (%s); closing the link from the previous one", err)
        self.dead = err
        if self.abort is not None:
            self.abort()

    def frame(self, raw: bytes) -> None:
        if self.dead is not None:
            raise RequestError("conflict", f"the link to the next stage ended: {self.dead}")
        f = decode(raw)
        if f.route != self.tag:
            raise RequestError("conflict", "a frame of another route on this link (a stale plan)")
        if isinstance(f, ErrorFrame):
            self.outlet.send(raw)        # an earlier stage failed this unit: pass it on as it is
            return
        try:
            self.ring.service.forward_async(ForwardCall(f.sequences, f.hidden), lambda run, err: self._done(f, run, err))
        except Exception as e:           # refused before any compute (size, no shard)
            self._done(f, None, e)

    def _done(self, f: UnitFrame, run, err) -> None:
        if err is not None:
            kind = err.kind if isinstance(err, RequestError) else "invalid" if isinstance(err, (ValueError, TypeError)) \
                else "internal"
            self.outlet.send(encode_error(f.route, f.unit, self.stage, kind, str(err)))
            return
        out = UnitFrame(f.route, f.unit, f.sequences, run.hidden, run.positions, f.compute_us + (run.compute_us,),
                        f.batch_rows + (run.batch_rows,), f.headers)
        self.outlet.send(encode_result(out) if self.last else encode_unit(out))

    def adopt(self, inlet) -> None:
        """A socket link: the MLX thread reads its frames itself (worker/compute.py)."""
        self.ring.service.compute.add_inlet(inlet, self.frame)

    def outgoing(self):
        return iter(())

    def close(self) -> None:
        self.ring.feed_closed(self)


MAX_PLANS = 8   # plans (coordinators) one shard serves at once; the oldest's links close first


class RingStage:
    """Accepts the plans' links for one worker (`service` holds the shard and the compute loop).

    Several coordinators may plan the same shard (each attach names a fresh route): every plan
    of the shard this worker holds keeps its own feed and sink, so one coordinator's re-plan
    never cuts another's ring. Loading a different shard ends every plan of the old one."""

    def __init__(self, service):
        self.service = service
        self.lock = threading.Lock()
        self.plans: OrderedDict[str, object] = OrderedDict()   # route -> ShardSpec, newest last
        self.feeds: dict[str, _Feed] = {}
        self.sinks: dict[str, _Sink] = {}

    def planned(self, spec) -> None:
        """The shard `spec` was loaded (or confirmed) under its plan's route."""
        with self.lock:
            if any(s.digest() != spec.digest() for s in self.plans.values()):
                stale = list(self.plans)
                self.plans.clear()
            else:
                stale = []
            self.plans.pop(spec.route, None)
            self.plans[spec.route] = spec
            while len(self.plans) > MAX_PLANS:
                stale.append(self.plans.popitem(last=False)[0])
        for route in stale:
            self._close_route(route)

    def _close_route(self, route: str) -> None:
        with self.lock:
            feed, sink = self.feeds.pop(route, None), self.sinks.pop(route, None)
        if feed is not None:
            feed.outlet.close()
        if sink is not None:
            sink.close()

    def open_link(self, hello: Hello):
        """Check the hello against this worker's plans; the link's end, or RequestError."""
        if hello.schema != SCHEMA:
            raise RequestError("conflict", f"frame header schema {hello.schema}, this worker's {SCHEMA}: "
                                           "run the same mtpdist version everywhere")
        with self.lock:
            spec = self.plans.get(hello.route)
            unplanned = not self.plans and not hello.route     # no shard loaded yet: the plan of none
        if spec is None and not unplanned:
            raise RequestError("conflict", "a link of another plan (route); this worker was re-planned")
        route, upstream, downstream = (spec.route, spec.upstream, spec.downstream) if spec else ("", "", ())
        if hello.role == "sink":
            if downstream:
                raise RequestError("denied", "only the last stage sends units back to the coordinator")
            return self._sink_for(route)
        if hello.role != "feed":
            raise RequestError("invalid", f"unknown link role {hello.role!r}")
        if hello.sender != upstream:
            raise RequestError("denied", f"{hello.sender or 'the coordinator'} is not this stage's planned "
                                         f"predecessor ({upstream or 'the coordinator'})")
        if downstream:
            nxt = downstream[0]
            client = self.service._client(nxt)
            try:
                port = client.describe().link_port
            except WorkerCallError:
                port = 0          # the gRPC link will fail too, and the end travels down the ring
            feed = _Feed(self, hello)
            feed.outlet = dial(client, port, Hello(route, "feed", hello.to, nxt, hello.stage + 1),
                               on_end=feed.broken)
        else:
            feed = _Feed(self, hello)
            feed.outlet, feed.last = self._sink_for(route), True
        with self.lock:
            old, self.feeds[route] = self.feeds.get(route), feed
        if old is not None:
            log.info("a new feed link replaces the old one")
            old.outlet.close()
        return feed

    def _sink_for(self, route: str) -> _Sink:
        """The last stage's outlet for `route`: made by whichever link comes first."""
        with self.lock:
            if route not in self.sinks:
                self.sinks[route] = _Sink()
            return self.sinks[route]

    def feed_closed(self, feed: _Feed) -> None:
        """The feed ended (the plan closed, or the sender is gone): end our outlet too, so the
        end travels down the ring."""
        with self.lock:
            route = next((r for r, f in self.feeds.items() if f is feed), None)
            if route is not None:
                del self.feeds[route]
                if self.sinks.get(route) is feed.outlet:
                    del self.sinks[route]
        feed.outlet.close()
