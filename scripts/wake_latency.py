"""What waking a blocked thread or process costs on this machine (medians of 2,000 round trips).

Each hop of the ring wakes at least one blocked thread: the next stage's MLX thread waiting in
`select`, the coordinator's sink reader, and the scheduler thread the sink hands units to. On a
virtual machine a wake-up aimed at an idle vCPU can cost far more than the work around it.
Run it free and under `taskset -c 0` (everything on one core) to see that share:

    python scripts/wake_latency.py
    taskset -c 0 python scripts/wake_latency.py
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time

N = 2000


def _median(f) -> float:
    ts = []
    for _ in range(N):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return round(sorted(ts)[N // 2] * 1e6, 1)


def tcp_round_trip() -> float:
    """A 32-byte message to another process over loopback TCP and back (blocking reads)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pid = os.fork()
    if pid == 0:
        a.close()
        while (data := b.recv(64)):
            b.sendall(data)
        os._exit(0)
    b.close()

    def once():
        a.sendall(b"x" * 32)
        a.recv(64)
    us = _median(once)
    a.close()
    os.waitpid(pid, 0)
    return us


def thread_round_trip() -> float:
    """A hand-off to another thread of this process through a queue, and back."""
    there, back = queue.SimpleQueue(), queue.SimpleQueue()

    def echo():
        while (x := there.get()) is not None:
            back.put(x)
    t = threading.Thread(target=echo)
    t.start()

    def once():
        there.put(1)
        back.get()
    us = _median(once)
    there.put(None)
    t.join()
    return us


def mlx_eval() -> float:
    """`mx.eval` of one tiny op: MLX runs it on its stream's own thread and waits for it."""
    import mlx.core as mx
    x = mx.ones((256,))
    mx.eval(x)
    return _median(lambda: mx.eval(x * 2))


if __name__ == "__main__":
    print(json.dumps({"cores": sorted(os.sched_getaffinity(0)), "tcp_round_trip_us": tcp_round_trip(),
                      "thread_round_trip_us": thread_round_trip(), "mlx_eval_tiny_us": mlx_eval()}))
