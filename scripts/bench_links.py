#!/usr/bin/env python3
"""What one link costs, without any model: a frame echoed by another process over loopback,
both over mutual TLS from one cluster secret, (a) on a persistent gRPC bidirectional stream
(the ring's links) and (b) on a raw TLS socket (what a socket data plane would pay).
One-way cost = round trip / 2, median of --n round trips after a warm-up; writes JSON.

  python scripts/bench_links.py --bytes 8192 --n 2000 --out benchmarks/links-loopback.json
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

from mtpdist.security import node_identity
from mtpdist.wire.auth import channel_credentials, server_credentials
from mtpdist.wire.auth import channel_options as tls_options

SECRET = "bench-links-secret"
_LEN = struct.Struct("<I")


def _tls_files(tmp: Path):
    ident = node_identity(SECRET)
    for name, pem in (("ca", ident.ca_pem), ("cert", ident.cert_pem), ("key", ident.key_pem)):
        (tmp / f"{name}.pem").write_bytes(pem)
    return ident, tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"


def serve(kind: str) -> None:
    """The echo end: prints its port, echoes until killed."""
    with tempfile.TemporaryDirectory() as t:
        ident, ca, cert, key = _tls_files(Path(t))
        if kind == "grpc":
            def echo(requests, context):
                yield from requests
            server = grpc.server(futures.ThreadPoolExecutor(4))
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "bench.Echo", {"Link": grpc.stream_stream_rpc_method_handler(echo)}),))
            port = server.add_secure_port("127.0.0.1:0", server_credentials(ident))
            server.start()
            print(port, flush=True)
            server.wait_for_termination()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        lsock = socket.create_server(("127.0.0.1", 0))
        print(lsock.getsockname()[1], flush=True)
        conn = ctx.wrap_socket(lsock.accept()[0], server_side=True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = _recv(conn, 4)
            conn.sendall(head + _recv(conn, _LEN.unpack(head)[0]))


def _recv(conn, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def measure(kind: str, size: int, n: int) -> float:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        frame = bytes(size)
        with tempfile.TemporaryDirectory() as t:
            ident, ca, cert, key = _tls_files(Path(t))
            if kind == "grpc":
                ch = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(ident), options=tls_options(ident))
                q: queue.SimpleQueue = queue.SimpleQueue()
                replies = ch.stream_stream("/bench.Echo/Link")(iter(q.get, None))

                def trip():
                    q.put(frame)
                    next(replies)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_cert_chain(cert, key)
                ctx.load_verify_locations(ca)
                conn = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=ident.server_name)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def trip():
                    conn.sendall(_LEN.pack(size) + frame)
                    _recv(conn, 4 + size)
            times = []
            for i in range(n + n // 10):
                t0 = time.perf_counter()
                trip()
                if i >= n // 10:
                    times.append(time.perf_counter() - t0)
            if kind == "grpc":
                q.put(None)
        return statistics.median(times) / 2 * 1e6
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=["grpc", "tls"])
    ap.add_argument("--bytes", type=int, default=8192, help="frame size (8192: one decode row of a 4096-wide bf16 model)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return
    runs = {k: [round(measure(k, a.bytes, a.n), 1) for _ in range(a.repeats)] for k in ("grpc", "tls")}
    out = {"bytes": a.bytes, "round_trips": a.n, "machine": platform.platform(),
           "one_way_us_median": {k: statistics.median(v) for k, v in runs.items()}, "runs_one_way_us": runs}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
