"""A rogue on the cluster's network, for tests: it clones a real worker's mDNS advert (a new
name, its own port, claiming far more memory) without knowing the cluster secret, serves TLS
with a CA of its own, and records every byte it is sent, raw and after decryption.

Usage: python rogue.py CLUSTER SECRET_GUESS. Prints "up PORT NAME" once advertised; each
line "dump" on stdin prints one JSON line with what was received since the start.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from mtpdist.discovery import SERVICE, Advertiser, Browser
from mtpdist.security import node_identity

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


def main() -> None:
    cluster, guess = sys.argv[1], sys.argv[2]
    outer = recorder(tls_server(guess).getsockname())
    browser = Browser(["127.0.0.1"], cluster)
    real = browser.wait_for(1, timeout=30)[0]
    browser.close()
    fake = replace(real, worker_id="rogue" + real.worker_id[:6], port=outer.getsockname()[1],
                   usable_bytes=real.usable_bytes * 1000)
    adv = Advertiser(fake, ["127.0.0.1"])
    print("up", fake.port, f"mtpdist-{fake.worker_id}.{SERVICE}", flush=True)
    for line in sys.stdin:
        if line.strip() == "dump":
            with lock:
                print(json.dumps({"connections": connections, "raw": base64.b64encode(bytes(raw)).decode(),
                                  "plain": base64.b64encode(bytes(plain)).decode(), "errors": errors}), flush=True)
    adv.close()


if __name__ == "__main__":
    main()
