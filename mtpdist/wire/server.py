"""Serve a worker implementation over gRPC: convert messages, map errors to status codes."""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable, Iterator, Protocol

import grpc

from ..errors import RequestError, WorkerCallError
from . import convert as cv
from .errors import status_of
from .auth import TlsIdentity, server_credentials
from .client import KEEPALIVE_MS, server_options
from .frames import Hello
from .links import LinkEnd, link_handler
from .types import ForwardCall, ForwardResult, LoadResult, ShardSpec, WorkerInfo
from .v1 import worker_pb2 as pb
from .v1 import worker_pb2_grpc as pbg

log = logging.getLogger("mtpdist.wire")


class WorkerHandler(Protocol):
    """What a worker implements; the wire layer turns it into the gRPC service."""
    def describe(self) -> WorkerInfo: ...
    def has_shard(self, spec: ShardSpec) -> tuple[bool, str]: ...
    def load_shard(self, spec: ShardSpec, chunks: Iterator[bytes]) -> LoadResult: ...
    def forward(self, call: ForwardCall, deadline: float | None = None,
                active: Callable[[], bool] | None = None) -> ForwardResult: ...
    def release(self, sequence_id: str) -> bool: ...
    def keep(self, sequence_id: str, length: int, name: str) -> int: ...
    def fork(self, prefix: str, sequence_id: str) -> int: ...
    def health(self) -> str: ...
    def open_link(self, hello: Hello) -> LinkEnd: ...   # the ring (mtpdist/wire/links.py)


class PortInUse(OSError):
    """The worker's port is taken (or the address is not ours)."""


def _guard(fn):
    """Run a handler; turn our errors into the right gRPC status, never crash the server."""
    def wrapped(self, request, context):
        try:
            return fn(self, request, context)
        except RequestError as e:
            context.abort(status_of(e.kind), str(e))
        except WorkerCallError as e:  # a downstream worker failed: pass its status on
            context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNAVAILABLE), str(e))
        except (ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    wrapped.__name__ = fn.__name__
    return wrapped


class _Servicer(pbg.WorkerServicer):
    def __init__(self, handler: WorkerHandler):
        self.h = handler

    @_guard
    def Describe(self, request, context):
        return cv.info_to_pb(self.h.describe())

    @_guard
    def HasShard(self, request, context):
        ok, source = self.h.has_shard(cv.spec_from_pb(request))
        return pb.HasShardReply(available=ok, source=source)

    @_guard
    def LoadShard(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "spec":
            raise RequestError("invalid", "LoadShard must start with a ShardSpec")
        chunks = (r.data for r in request_iterator if r.WhichOneof("part") == "data")
        return cv.load_result_to_pb(self.h.load_shard(cv.spec_from_pb(first.spec), chunks))

    @_guard
    def Forward(self, request, context):
        return cv.result_to_pb(self.h.forward(cv.forward_from_pb(request), context.time_remaining(), context.is_active))

    @_guard
    def Release(self, request, context):
        if request.keep_as:
            return pb.ReleaseReply(released=True,
                                   position=self.h.keep(request.sequence_id, request.length, request.keep_as))
        return pb.ReleaseReply(released=self.h.release(request.sequence_id))

    @_guard
    def Fork(self, request, context):
        return pb.ForkReply(position=self.h.fork(request.prefix, request.sequence_id))

    @_guard
    def Health(self, request, context):
        return pb.HealthReply(status=self.h.health())


def serve(handler: WorkerHandler, host: str, port: int, identity: TlsIdentity | None = None,
          threads: int = 16, keepalive_ms: int = KEEPALIVE_MS) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `handler`; returns the server and the bound port.

    With `identity`, the server speaks mutual TLS and serves only callers whose certificate
    chains to the cluster CA; without it, plaintext (the CLI allows that on loopback only).
    Raises PortInUse when the port is taken (by another worker, say).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=server_options(keepalive_ms))
    pbg.add_WorkerServicer_to_server(_Servicer(handler), server)
    server.add_generic_rpc_handlers((link_handler(handler),))
    where = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(where, server_credentials(identity)) if identity
                 else server.add_insecure_port(where))
    except RuntimeError:  # grpc raises "Failed to bind" when the port is taken
        bound = 0
    if bound == 0:
        server.stop(None)
        raise PortInUse(f"cannot listen on {where}: the port is in use (another worker?) or the address "
                        "is not this machine's; pick another with --port")
    server.start()
    return server, bound
