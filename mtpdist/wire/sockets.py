"""The ring's links over raw sockets: mutual TLS from the same cluster identity as gRPC, a
length-prefixed frame per unit, no gRPC threads in the path.

A worker offers a link port in Describe (`listen_links`); a dialer that sees one uses it,
else the gRPC stream links of mtpdist/wire/links.py (`dial` chooses). The first frame each
way is the hello and its answer (OK, or the gRPC status name a gRPC link would have ended
with). After it, a socket carries frames one way only: a feed is written by the dialer (from
the thread that made the frame: the MLX thread on a worker) and read by the worker's MLX
thread itself (`Inlet`); a sink is written by the last worker's MLX thread and read by the
coordinator. No thread wakes another between a frame's arrival at a worker, its compute and
its departure. (One TLS connection is never read and written by two threads at once.) A link ends when its socket closes; a worker whose feed
ends closes its own outlet, so the end travels down the ring to the coordinator's sink.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
from typing import Callable

from ..errors import RequestError, WorkerCallError
from .auth import TlsIdentity
from .client import MAX_MESSAGE, WorkerClient
from .errors import status_of, worker_error
from .frames import Hello, decode_hello, encode_hello
from .links import Link, LinkHandler

log = logging.getLogger("mtpdist.wire")
_LEN = struct.Struct("<I")
_JOIN_MAX = 1 << 20
_BUFFER = 1 << 16        # a link's receive buffer: decode- and verify-sized frames fit whole
# A peer that stops in the middle of a frame must not hold a compute thread that reads it for ever.
_INLET_TIMEOUT = 30.0


def _context(identity: TlsIdentity, server: bool) -> ssl.SSLContext:
    """TLS 1.3 with this node's certificate, trusting only the cluster CA (both ends checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=identity.ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0    # nothing may arrive on a feed after the hello's answer but its end
    with tempfile.TemporaryDirectory() as tmp:   # the ssl module loads a key only from a file
        cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        for path, pem in ((cert, identity.cert_pem), (key, identity.key_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(pem)
        ctx.load_cert_chain(cert, key)
    return ctx


def _read_into(conn, view: memoryview) -> bool:
    """Fill `view` from the socket; False if the stream ends first."""
    got = 0
    while got < len(view):
        k = conn.recv_into(view[got:])
        if not k:
            return False
        got += k
    return True


def _read(conn, n: int) -> bytearray | None:
    buf = bytearray(n)
    return buf if _read_into(conn, memoryview(buf)) else None


def read_frame(conn) -> bytearray | None:
    """One frame, or None at the end of the stream."""
    head = _read(conn, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise RequestError("invalid", f"a frame of {n} bytes is over the limit {MAX_MESSAGE}")
    return _read(conn, n)


def write_frame(conn, frame) -> None:
    """Length and frame in one write (one TLS record, one system call) unless the frame is big,
    where the copy that would take costs more than a second write."""
    if len(frame) <= _JOIN_MAX:
        conn.sendall(_LEN.pack(len(frame)) + frame)
    else:
        conn.sendall(_LEN.pack(len(frame)))
        conn.sendall(frame)


class FrameReader:
    """Length-prefixed frames from a socket through one receive buffer: a small frame takes one
    receive instead of one for its length and one for its body, and frames that came together
    are taken without asking the socket again (each system call costs most when cold)."""

    def __init__(self, conn, size: int = _BUFFER):
        self.conn, self.buf = conn, bytearray(size)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0

    def _fill(self, need: int) -> bool:
        """Receive until `need` (<= the buffer's size) bytes are buffered; False at the stream's end."""
        if self.lo + need > len(self.buf):           # move the start of what is buffered to the front
            kept = bytes(self.view[self.lo:self.hi])
            self.view[:len(kept)] = kept
            self.lo, self.hi = 0, len(kept)
        while self.hi - self.lo < need:
            k = self.conn.recv_into(self.view[self.hi:])
            if not k:
                return False
            self.hi += k
        return True

    def read_length(self) -> int | None:
        """The next frame's length, or None at the end of the stream."""
        if not self._fill(4):
            return None
        (n,) = _LEN.unpack_from(self.buf, self.lo)
        self.lo += 4
        if n > MAX_MESSAGE:
            raise RequestError("invalid", f"a frame of {n} bytes is over the limit {MAX_MESSAGE}")
        return n

    def read_body(self, n: int) -> bytes | bytearray | None:
        """The `n` bytes of the frame whose length was read (a copy: the buffer is reused)."""
        if n <= len(self.buf):
            if not self._fill(n):
                return None
            body = bytes(self.view[self.lo:self.lo + n])
            self.lo += n
            return body
        body = bytearray(n)                          # a big frame: the rest straight into its own buffer
        have = self.hi - self.lo
        body[:have] = self.view[self.lo:self.hi]
        self.lo = self.hi = 0
        return body if _read_into(self.conn, memoryview(body)[have:]) else None

    def read_frame(self) -> bytes | bytearray | None:
        """One frame, or None at the end of the stream."""
        n = self.read_length()
        return None if n is None else self.read_body(n)


class Inlet(FrameReader):
    """A feed socket read by its stage's compute thread itself (`LinkEnd.adopt`): no reader
    thread wakes between a frame's arrival and its compute. `done()` hands the socket back to
    the link's server thread, which then closes it."""

    def __init__(self, conn, ended: threading.Event):
        super().__init__(conn)
        self.ended = ended
        self.busy = False        # a big frame is being read off the compute thread

    def fileno(self) -> int:
        return self.conn.fileno()

    def pending(self) -> bool:
        """Bytes already received (or decrypted) and buffered, which select() cannot see."""
        return self.hi > self.lo or (isinstance(self.conn, ssl.SSLSocket) and self.conn.pending() > 0)

    def done(self) -> None:
        self.ended.set()


def listen_links(handler: LinkHandler, host: str, identity: TlsIdentity | None, port: int = 0) -> int:
    """Accept ring links on `port` (0: a free one) of `host` (mutual TLS with `identity`;
    plaintext without, which the worker allows on loopback only); returns the port."""
    ctx = _context(identity, server=True) if identity is not None else None
    lsock = socket.create_server((host, port))

    def accept():
        while True:
            sock, _ = lsock.accept()
            threading.Thread(target=_serve, args=(handler, ctx, sock), name="link-in", daemon=True).start()
    threading.Thread(target=accept, name="link-accept", daemon=True).start()
    return lsock.getsockname()[1]


def _serve(handler: LinkHandler, ctx, sock) -> None:
    end, conn = None, sock
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)              # the handshake and the hello; frames then wait for ever
        conn = ctx.wrap_socket(sock, server_side=True) if ctx is not None else sock
        raw = read_frame(conn)
        if raw is None:
            return
        try:
            hello = decode_hello(raw)
            end = handler.open_link(hello)
        except RequestError as e:
            log.warning("refused a link: %s", e)
            write_frame(conn, json.dumps({"code": status_of(e.kind).name, "details": str(e)}).encode())
            return
        write_frame(conn, b'{"code": "OK"}')
        conn.settimeout(None)
        end.abort = lambda: _shutdown(conn)   # our outlet broke: end this link, so the sender knows
        if hello.role == "sink" and hasattr(end, "attach"):
            # The compute thread writes the frames itself; this thread only waits for the end
            # (the coordinator never writes on a sink, so readable means it went away).
            ended = end.attach(lambda frame: write_frame(conn, frame))
            while not ended.is_set() and not select.select([conn], [], [], 1.0)[0]:
                pass
        elif hello.role == "sink":
            for frame in end.outgoing():
                write_frame(conn, frame)
        elif hasattr(end, "adopt"):
            ended = threading.Event()
            conn.settimeout(_INLET_TIMEOUT)
            end.adopt(Inlet(conn, ended))
            ended.wait()
        else:
            reader = FrameReader(conn)
            while (frame := reader.read_frame()) is not None:
                end.frame(frame)
    except RequestError as e:            # a frame this link must not carry: the link ends
        log.warning("closed a link: %s", e)
    except (OSError, ValueError):
        pass                             # the peer went away (or never finished the handshake)
    finally:
        if end is not None:
            end.close()
        conn.close()


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SocketLink:
    """The dialing end of a socket link, with gRPC `Link`'s interface. `send` writes on the
    calling thread; a sink's frames go to `on_frame` on a reader thread; the end (not ours)
    to `on_end`, once."""

    def __init__(self, client: WorkerClient, port: int, hello: Hello,
                 on_frame: Callable[[bytes], None] | None = None,
                 on_end: Callable[[WorkerCallError], None] | None = None):
        self.address, self.on_frame, self.on_end = client.address, on_frame, on_end
        self.closed, self.ended = False, False
        self.lock = threading.Lock()
        self.conn = None
        host = client.address.rsplit(":", 1)[0].strip("[]")
        identity = client.settings.identity
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _context(identity, False).wrap_socket(sock, server_hostname=identity.server_name) \
                if identity is not None else sock
            write_frame(conn, encode_hello(hello))
            reply = json.loads(bytes(read_frame(conn) or b'{"code": "UNAVAILABLE", "details": "closed"}'))
            conn.settimeout(None)
        except (OSError, ValueError) as e:
            self._end(worker_error(self.address, "UNAVAILABLE", f"link: {e}"), later=True)
            return
        if reply.get("code") != "OK":
            conn.close()
            self._end(worker_error(self.address, reply.get("code", "UNKNOWN"), reply.get("details", "")), later=True)
            return
        self.conn = conn
        reader = self._read if hello.role == "sink" else self._watch
        threading.Thread(target=reader, name=f"link-{hello.role}-{hello.stage}", daemon=True).start()

    def _end(self, err: WorkerCallError, later: bool = False) -> None:
        with self.lock:
            if self.ended or self.closed or self.on_end is None:
                self.ended = True
                return
            self.ended = True
        if later:    # never call back from the constructor: the caller is not ready for it
            threading.Thread(target=self.on_end, args=(err,), daemon=True).start()
        else:
            self.on_end(err)

    def _read(self) -> None:
        reader = FrameReader(self.conn)
        try:
            while (frame := reader.read_frame()) is not None:
                self.on_frame(frame)
            err = worker_error(self.address, "UNAVAILABLE", "the link was closed by the worker")
        except (OSError, RequestError) as e:
            err = worker_error(self.address, "UNAVAILABLE", f"the link broke: {e}")
        self._end(err)

    def _watch(self) -> None:
        """A feed carries nothing back: the socket turning readable means the worker ended the
        link (it closed, or its own outlet broke). Only watched, never read: this thread must not
        use the TLS connection while another writes to it."""
        try:
            select.select([self.conn], [], [])
        except (OSError, ValueError):
            pass
        self._end(worker_error(self.address, "UNAVAILABLE", "the link was closed by the worker"))

    def send(self, frame: bytes) -> None:
        if self.conn is None or self.ended:
            return
        try:
            with self.lock:
                write_frame(self.conn, frame)
        except OSError as e:
            self._end(worker_error(self.address, "UNAVAILABLE", f"the link broke: {e}"))

    def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()

    cancel = close


def dial(client: WorkerClient, port: int, hello: Hello, on_frame=None, on_end=None):
    """A link to `client`'s worker: over its link port if it offers one, else a gRPC stream."""
    if port:
        return SocketLink(client, port, hello, on_frame, on_end)
    return Link(client, hello, on_frame, on_end)
