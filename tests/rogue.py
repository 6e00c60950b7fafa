"""A rogue on the cluster's network, for tests: it clones a real worker's mDNS advert (a new
name, its own port, claiming far more memory) without knowing the cluster secret, serves TLS
with a CA of its own, and records every byte it is sent, raw and after decryption.

Usage: python rogue.py CLUSTER SECRET_GUESS [KIND] [--alone]. KIND is what answers on the
advertised port: "tls" (default; a certificate from its own CA), "plaintext" (an HTTP/2 server
without TLS), "tarpit" (accepts and never says a word) or "closed" (nothing listens). With
--alone it advertises at once, without waiting for a real worker to clone. Prints "up PORT
NAME" per advert (KIND may list several, comma-separated: one advert each); each line "dump"
on stdin prints one JSON line with what was received.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from mtpdist.discovery import SERVICE, Advert, Advertiser, Browser
from mtpdist.security import node_identity
from mtpdist.wire.types import PROTOCOL_VERSION

lock = threading.Lock()
raw, plain, errors = bytearray(), bytearray(), []
connections = 0


def tls_server(guess: str) -> socket.socket:
    ident = node_identity(guess)   # a certificate from its own CA: it does not hold the cluster secret
    folder = Path(tempfile.mkdtemp())
    (folder / "cert.pem").write_bytes(ident.cert_pem + ident.ca_pem)
    (folder / "key.pem").write_bytes(ident.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    inner = socket.create_server(("127.0.0.1", 0))

    def conn(c):
        try:
            s = ctx.wrap_socket(c, server_side=True)
            s.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame: "go on"
            while data := s.recv(65536):
                with lock:
                    plain.extend(data)
        except (ssl.SSLError, OSError) as e:
            with lock:
                errors.append(repr(e))

    def accept():
        while True:
            c, _ = inner.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return inner


def recorder(inner_address) -> socket.socket:
    """The advertised port: records the raw bytes, relays them to the TLS server."""
    outer = socket.create_server(("127.0.0.1", 0))

    def pump(a, b, record):
        try:
            while data := a.recv(65536):
                if record:
                    with lock:
                        raw.extend(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept():
        global connections
        while True:
            c, _ = outer.accept()
            with lock:
                connections += 1
            u = socket.create_connection(inner_address)
            threading.Thread(target=pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=pump, args=(u, c, False), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return outer


def plain_server(answer: bool) -> socket.socket:
    """Records what it is sent; answers with a plaintext HTTP/2 SETTINGS frame, or never (a tarpit)."""
    sock = socket.create_server(("127.0.0.1", 0))

    def conn(c):
        try:
            while data := c.recv(65536):
                with lock:
                    raw.extend(data)
                if answer:
                    c.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        except OSError:
            pass

    def accept():
        global connections
        while True:
            c, _ = sock.accept()
            with lock:
                connections += 1
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return sock


def listener(kind: str, guess: str) -> tuple[int, object]:
    """The advertised port for `kind`, and the socket to keep open (None for a closed port)."""
    if kind == "tls":
        s = recorder(tls_server(guess).getsockname())
    elif kind in ("plaintext", "tarpit"):
        s = plain_server(answer=kind == "plaintext")
    elif kind == "closed":
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # the port was free a moment ago and nothing listens on it now
        return port, None
    else:
        raise SystemExit(f"unknown rogue kind {kind!r}")
    return s.getsockname()[1], s


def main() -> None:
    cluster, guess = sys.argv[1], sys.argv[2]
    kinds = next((a for a in sys.argv[3:] if not a.startswith("--")), "tls").split(",")
    real = None
    if "--alone" not in sys.argv:   # clone a real worker's advert (never another rogue's)
        browser = Browser(["127.0.0.1"], cluster)
        deadline = time.monotonic() + 30
        while real is None and time.monotonic() < deadline:
            real = next((a for a in browser.wait_for(1, timeout=1) if not a.worker_id.startswith("rogue")), None)
        browser.close()
    adverts = []
    for kind in kinds:
        port, sock = listener(kind, guess)
        if real is None:   # before any real worker: an advert made up from scratch
            fake = Advert(worker_id=f"rogue{kind}{port}", port=port, links=(("127.0.0.1", "loopback"),),
                          protocol=PROTOCOL_VERSION, usable_bytes=1 << 40, backend="cpu", chip="x", cluster=cluster,
                          version="0.1.0")
        else:
            fake = replace(real, worker_id=f"rogue{kind}" + real.worker_id[:6], port=port,
                           usable_bytes=real.usable_bytes * 1000)
        adverts.append((Advertiser(fake, ["127.0.0.1"]), sock))
        print("up", fake.port, f"mtpdist-{fake.worker_id}.{SERVICE}", flush=True)
    for line in sys.stdin:
        if line.strip() == "dump":
            with lock:
                print(json.dumps({"connections": connections, "raw": base64.b64encode(bytes(raw)).decode(),
                                  "plain": base64.b64encode(bytes(plain)).decode(), "errors": errors}), flush=True)
    for adv, _ in adverts:
        adv.close()


if __name__ == "__main__":
    main()
