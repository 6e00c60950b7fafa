"""The floor under `mtpdist bench --scenario hop` on this machine: a bare ring in Python.

N forked processes pass one decode row around a ring of plaintext TCP sockets, as the
product's stages do, but with nothing else: no frames beyond a 24-byte header, no task
queue, no coordinator scheduler. Each stage runs the bundled model's layers through the
product's own `SequenceStore` (`--compute store`, the default), or the same layers with
none of the store's bookkeeping around them (`--compute layers`), or a few bf16 matmuls of
about the same duration (`--compute matmul`), or nothing (`--compute none`). Prints the
overhead per stage the way the hop bench counts it: (unit wall - stage compute) / stages.
What this measures here is what any Python stage pays on this box (waking a process,
running its code cold after compute), so it bounds what the product's ring can reach.

    python scripts/ring_floor.py --workers 2 [--units 150] [--compute store|layers|matmul|none]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import time

MODEL = os.path.join(os.path.dirname(__file__), "..", "mtpdist", "demo_model")
HDR = struct.Struct("<IIQq")      # frame length, unit, compute us so far, position
LAYERS = 8


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _stage_compute(kind: str, i: int, n: int):
    """A function (x [1, H] bf16 array, position) -> (output bits array, compute us)."""
    import mlx.core as mx
    if kind in ("store", "layers"):
        from mtpdist.model.cache import cache_arrays
        from mtpdist.model.loader import load_parts
        from mtpdist.wire.types import SequenceRows
        from mtpdist.worker.sequences import SequenceStore
        per = LAYERS // n
        parts = load_parts(MODEL, layers=(i * per, (i + 1) * per), head=False)
        store = SequenceStore(parts.stack, parts.config.hidden_size)
        caches = parts.stack.make_caches()

        def run(x, pos):
            if kind == "store":
                out = store.forward([SequenceRows("s", pos, 1)], x)
                return out.bits, out.compute_us
            t0 = time.perf_counter()      # the same layers and eval as the store's, nothing around them
            bits = parts.stack.ragged(x[None], [(caches, 1, ())])[0].view(mx.uint16)
            mx.eval(bits, *cache_arrays(caches))
            return bits, int((time.perf_counter() - t0) * 1e6)
        run.after = store.tidy if kind == "store" else None      # as a worker: once the output has gone
        return run
    w1 = mx.random.normal((256, 1024)).astype(mx.bfloat16)
    w2 = mx.random.normal((1024, 256)).astype(mx.bfloat16)
    mx.eval(w1, w2)

    def run(x, pos):
        t0 = time.perf_counter()
        for _ in range(0 if kind == "none" else 12):
            x = (x @ w1) @ w2 * 0.01
        bits = x.view(mx.uint16)
        mx.eval(bits)
        return bits, int((time.perf_counter() - t0) * 1e6)
    return run


def _stage(kind: str, i: int, n: int, listener: socket.socket, next_port: int, ready: int) -> None:
    import mlx.core as mx
    compute = _stage_compute(kind, i, n)
    os.write(ready, b"r")
    inlet, _ = listener.accept()
    inlet.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outlet = _connect(next_port)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        select.select([inlet], [], [])
        if inlet.recv_into(buf) == 0:
            return
        length, unit, us, pos = HDR.unpack_from(buf)
        x = mx.array(view[HDR.size:length].cast("H")).view(mx.bfloat16).reshape(1, -1)
        bits, took = compute(x, pos)
        body = memoryview(bits).cast("B")
        outlet.sendall(HDR.pack(HDR.size + len(body), unit, us + took, pos) + bytes(body))
        if getattr(compute, "after", None):
            compute.after()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--units", type=int, default=150)
    ap.add_argument("--compute", choices=["store", "layers", "matmul", "none"], default="store")
    args = ap.parse_args()
    n = args.workers
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(n + 1)]
    ports = [s.getsockname()[1] for s in listeners]
    ready_r, ready_w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                _stage(args.compute, i, n, listeners[i], ports[i + 1], ready_w)
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in range(n):
        os.read(ready_r, 1)
    import mlx.core as mx
    from mtpdist.model.loader import load_parts
    head = load_parts(MODEL, layers=(0, 0)).head
    feed = _connect(ports[0])
    sink, _ = listeners[n].accept()
    buf = bytearray(1 << 16)
    over, compute = [], []
    for u in range(args.units):
        t0 = time.perf_counter()
        bits = head.embed(mx.array([u % 500])).view(mx.uint16)
        mx.eval(bits)
        body = bytes(memoryview(bits).cast("B"))
        feed.sendall(HDR.pack(HDR.size + len(body), u, 0, u) + body)
        select.select([sink], [], [])
        sink.recv_into(buf)
        _, _, us, _ = HDR.unpack_from(buf)
        wall_us = (time.perf_counter() - t0) * 1e6
        if u >= 20:      # warm-up units dropped
            over.append((wall_us - us) / n)
            compute.append(us / n)
        time.sleep(0.002)    # the coordinator's own work between units
    feed.close()
    for pid in pids:
        os.waitpid(pid, 0)
    q = statistics.quantiles(over, n=4)
    print(f"{n} stages, compute {args.compute} ({statistics.median(compute):.0f} us a stage): overhead per "
          f"stage {statistics.median(over):.0f} us (quartiles {q[0]:.0f} / {q[2]:.0f})")


if __name__ == "__main__":
    main()
