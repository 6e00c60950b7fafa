"""A worker's gRPC client: every call has a deadline, failures name the worker."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc

from ..errors import MtpdistError, WorkerCallError
from . import convert as cv
from .errors import call_error, worker_error
from .auth import TlsIdentity, channel_credentials, is_loopback
from .auth import channel_options as tls_channel_options
from .types import ForwardCall, ForwardResult, LoadResult, ShardSpec, WorkerInfo
from .v1 import worker_pb2 as pb
from .v1 import worker_pb2_grpc as pbg

MAX_MESSAGE = 64 << 20  # activations of a 512-token chunk of a 27B model are ~10 MiB
KEEPALIVE_MS = 10_000  # an idle link is pinged this often, so a dead peer shows within seconds


def channel_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple]:
    """Options of a channel to a worker (pings every `keepalive_ms`, even with no call open)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", min(5_000, keepalive_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A restarted worker must be reachable at once: no subchannel (and its reconnect
        # backoff) shared with an earlier channel to the dead process, and short backoffs.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple]:
    """Options of a worker's server: it must accept the pings its clients send (by default a
    server allows one ping per 5 minutes without data and answers more with GOAWAY
    too_many_pings), and must own its port (no SO_REUSEPORT: a second worker on the same
    port fails to start instead of silently sharing it)."""
    return channel_options(keepalive_ms) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


CHANNEL_OPTIONS = channel_options()


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach workers: this node's TLS identity (None: plaintext, loopback only) and deadlines."""

    identity: TlsIdentity | None = None
    plaintext_network: bool = False  # without an identity, allow non-loopback workers (--allow-insecure-network)
    timeout: float = 30.0          # any call, prefill chunks included
    step_timeout: float = 5.0      # a decode/verify forward (few tokens): a hung worker shows fast
    load_timeout: float = 3600.0
    keepalive_ms: int = KEEPALIVE_MS

    def forward_timeout(self, tokens: int) -> float:
        return self.step_timeout if tokens <= 16 else self.timeout


class WorkerClient:
    """Calls one worker over mutual TLS (or plaintext without an identity). Every call has a deadline."""

    def __init__(self, address: str, settings: ChannelSettings = ChannelSettings()):
        self.address, self.settings = address, settings
        self.timeout, self.load_timeout = settings.timeout, settings.load_timeout
        self.md: tuple = ()  # no per-call credentials: mutual TLS proves both ends on the channel
        if settings.identity is not None:
            self.channel = grpc.secure_channel(address, channel_credentials(settings.identity),
                                               options=channel_options(settings.keepalive_ms)
                                               + tls_channel_options(settings.identity))
        elif is_loopback(address) or settings.plaintext_network:
            self.channel = grpc.insecure_channel(address, options=channel_options(settings.keepalive_ms))
        else:
            raise MtpdistError(f"worker {address} is not on loopback and there is no cluster secret (--insecure): "
                               "weights and prompts would cross the network in plaintext. Use the cluster secret, "
                               "or --allow-insecure-network on a network you fully trust")
        self.stub = pbg.WorkerStub(self.channel)
        self._pending: set = set()  # fire-and-forget calls still in flight

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise call_error(self.address, e) from None

    def describe(self) -> WorkerInfo:
        return cv.info_from_pb(self._call(self.stub.Describe, pb.DescribeRequest()))

    def has_shard(self, spec: ShardSpec) -> tuple[bool, str]:
        r = self._call(self.stub.HasShard, cv.spec_to_pb(spec))
        return r.available, r.source

    def load_shard(self, spec: ShardSpec, chunks: Iterable[bytes] = ()) -> LoadResult:
        """Send the spec, then the chunks. The chunks are pulled on the calling thread
        (MLX arrays belong to the thread that made them) and handed to gRPC through a
        small bounded queue, so at most a few chunks are in memory at once."""
        q: queue.Queue = queue.Queue(maxsize=4)
        done = object()

        def requests() -> Iterator[pb.LoadShardRequest]:
            yield pb.LoadShardRequest(spec=cv.spec_to_pb(spec))
            while (c := q.get()) is not done:
                yield pb.LoadShardRequest(data=c)

        fut = self.stub.LoadShard.future(requests(), timeout=self.load_timeout)
        try:
            for c in chunks:
                while not fut.done():
                    try:
                        q.put(c, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if fut.done():
                    break
        finally:
            q.put(done) if not fut.done() else None
        try:
            return cv.load_result_from_pb(fut.result())
        except grpc.RpcError as e:
            raise call_error(self.address, e) from None

    def _forward_timeout(self, call: ForwardCall, timeout: float | None) -> float:
        return timeout or self.settings.forward_timeout(call.rows)

    def forward(self, call: ForwardCall, timeout: float | None = None) -> ForwardResult:
        return cv.result_from_pb(self._call(self.stub.Forward, cv.forward_to_pb(call),
                                            self._forward_timeout(call, timeout)))

    def forward_async(self, call: ForwardCall, done: Callable[[ForwardResult | WorkerCallError], None],
                      timeout: float | None = None):
        """Start a Forward without waiting; `done` gets the result or the error, on a gRPC thread.
        Returns a handle whose `cancel()` abandons the call."""
        fut = self.stub.Forward.future(cv.forward_to_pb(call), timeout=self._forward_timeout(call, timeout),
                                       metadata=self.md)

        def finished(f) -> None:
            try:
                out = cv.result_from_pb(f.result())
            except grpc.RpcError as e:
                out = call_error(self.address, e)
            except grpc.FutureCancelledError:
                out = worker_error(self.address, "CANCELLED", getattr(fut, "reason", "") or "abandoned by the caller")
            done(out)
        fut.add_done_callback(finished)
        return fut

    def release(self, sequence_id: str) -> bool:
        return self._call(self.stub.Release, pb.ReleaseRequest(sequence_id=sequence_id)).released

    def keep(self, sequence_id: str, length: int, name: str, timeout: float = 5.0) -> int:
        """End a sequence but keep its state (taken back to `length` tokens) under `name`; the kept length."""
        req = pb.ReleaseRequest(sequence_id=sequence_id, length=length, keep_as=name)
        return self._call(self.stub.Release, req, timeout).position

    def fork(self, prefix: str, sequence_id: str, timeout: float = 5.0) -> int:
        """Start `sequence_id` from the kept state `prefix`; returns its position."""
        return self._call(self.stub.Fork, pb.ForkRequest(prefix=prefix, sequence_id=sequence_id), timeout).position

    def release_nowait(self, sequence_id: str, timeout: float = 2.0):
        """Send a Release and return at once (its future): a stalled worker must not hold up
        whoever is done with the sequence. A release that never lands is undone by the
        worker's idle-sequence TTL."""
        fut = self.stub.Release.future(pb.ReleaseRequest(sequence_id=sequence_id), timeout=timeout,
                                       metadata=self.md)
        # gRPC cancels a call whose future is garbage-collected: keep it until it is done.
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    def health(self, timeout: float | None = None) -> str:
        return self._call(self.stub.Health, pb.HealthRequest(), timeout).status

    def close(self) -> None:
        self.channel.close()
