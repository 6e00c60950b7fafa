"""gRPC keepalive without GOAWAY, one worker per port, per-port ids and memory offers, idle-sequence
expiry, fire-and-forget releases, and the classification of worker failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

KEEPALIVE_SCRIPT = textwrap.dedent("""
    import sys, tempfile, time
    from pathlib import Path
    from mtpdist.wire.client import ChannelSettings, WorkerClient
    from mtpdist.wire.server import serve
    from mtpdist.worker.service import WorkerService
    server, port = serve(WorkerService(Path(tempfile.mkdtemp())), "127.0.0.1", 0, keepalive_ms=200)
    client = WorkerClient(f"127.0.0.1:{port}", ChannelSettings(keepalive_ms=200))
    print(client.health(), flush=True)
    time.sleep(5)  # idle: the client pings (gRPC spaces them >= 1 s apart), more than 2 ping intervals
    print(client.health(), flush=True)
""")


def test_idle_connection_keepalive_pings_are_accepted():
    p = subprocess.run([sys.executable, "-c", KEEPALIVE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["idle", "idle"]
    assert "GOAWAY" not in p.stderr and "too_many_pings" not in p.stderr, p.stderr[-2000:]
