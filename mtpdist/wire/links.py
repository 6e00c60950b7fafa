"""The ring's links: persistent gRPC bidirectional streams carrying raw frames (mtpdist/wire/frames.py).

A link is opened once per plan over a worker's ordinary channel (so over the same mutual TLS
as every other call) on the method /mtpdist.v1.Ring/Link, registered without protobuf: each
message is a frame's bytes as they are. The first message is a `Hello`; the stage refuses a
link that is not its plan's (route id) or not from its planned predecessor, with
FAILED_PRECONDITION or PERMISSION_DENIED. Feed links carry units downstream and answer
nothing; the coordinator's sink link to the last stage carries nothing up and gets the
finished units back.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator, Protocol

import grpc

from ..errors import RequestError, WorkerCallError
from .client import WorkerClient
from .errors import call_error, status_of, worker_error
from .frames import Hello, decode_hello, encode_hello

log = logging.getLogger("mtpdist.wire")

SERVICE, METHOD = "mtpdist.v1.Ring", "Link"
_PATH = f"/{SERVICE}/{METHOD}"
_END = object()


class LinkEnd(Protocol):
    """A stage's end of one link (worker/ring.py)."""
    def frame(self, raw: bytes) -> None: ...           # a feed link's frame; RequestError refuses the link
    def outgoing(self) -> Iterator[bytes]: ...         # a sink link's frames, until closed
    def close(self) -> None: ...
    abort: Callable[[], None]                          # set by the link's server: end the link from our side
    # Optional, socket links only (mtpdist/wire/sockets.py): `adopt(inlet)` (a feed read by the
    # stage's compute thread itself) and `attach(write) -> Event` (a sink written by whoever sends).


class LinkHandler(Protocol):
    def open_link(self, hello: Hello) -> LinkEnd: ...


def unit_error(address: str, kind: str, details: str) -> WorkerCallError:
    """A unit that a worker failed (an error frame), as if the call to that worker had failed."""
    return WorkerCallError(address, kind, status_of(kind).name, details)


def link_handler(handler: LinkHandler) -> grpc.GenericRpcHandler:
    """The Link method for a worker's gRPC server (frames pass as bytes, no (de)serializer)."""
    def link(requests, context):
        try:
            hello = decode_hello(next(requests))
            end = handler.open_link(hello)
        except StopIteration:
            return
        except RequestError as e:
            log.warning("refused a link: %s", e)
            context.abort(status_of(e.kind), str(e))
        end.abort = context.cancel           # our outlet broke: end this link, so the sender knows
        try:
            if hello.role == "sink":
                context.add_callback(end.close)   # the coordinator went away: stop waiting for frames
                yield from end.outgoing()
            else:
                for raw in requests:
                    end.frame(raw)
        except RequestError as e:
            log.warning("closed a link: %s", e)
            context.abort(status_of(e.kind), str(e))
        except grpc.RpcError:
            pass        # the sender went away: closing our end passes that on down the ring
        finally:
            end.close()
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(link)})


class Link:
    """The dialing end of one link: `send` queues a frame (never blocks); frames that come back
    go to `on_frame` and the link's end (None if we closed it) to `on_end`, on its reader thread."""

    def __init__(self, client: WorkerClient, hello: Hello, on_frame: Callable[[bytes], None] | None = None,
                 on_end: Callable[[WorkerCallError], None] | None = None):
        self.address = client.address
        self.on_frame, self.on_end = on_frame, on_end
        self.closed = False
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.out.put(encode_hello(hello))
        # No deadline: the link lives as long as the plan; keepalive pings find a dead peer.
        self.call = client.channel.stream_stream(_PATH)(self._requests(), metadata=client.md)
        self.reader = threading.Thread(target=self._read, name=f"link-{hello.role}-{hello.stage}", daemon=True)
        self.reader.start()

    def _requests(self):
        while (f := self.out.get()) is not _END:
            yield f

    def send(self, frame: bytes) -> None:
        self.out.put(frame)

    def _read(self) -> None:
        err = None
        try:
            for raw in self.call:
                if self.on_frame is not None:
                    self.on_frame(raw)
        except grpc.RpcError as e:
            err = call_error(self.address, e)
        if self.closed or self.on_end is None:
            return
        self.on_end(err or worker_error(self.address, "UNAVAILABLE", "the link was closed by the worker"))

    def close(self) -> None:
        """Half-close (a feed: frames already queued still go), then stop reading."""
        if not self.closed:
            self.closed = True
            self.out.put(_END)

    def cancel(self) -> None:
        """Drop the link at once (a sink, or on teardown)."""
        self.closed = True
        self.out.put(_END)
        self.call.cancel()
