"""Cluster tokens on every RPC, TLS, and placement as a pure function."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from mtpdist.coordinator.local_cluster import LocalWorker
from mtpdist.errors import WorkerCallError
from mtpdist.placement import PlacementError, plan_layers
from mtpdist.wire.client import ChannelSettings, WorkerClient


def test_token_required_on_every_call(tmp_path):
    w = LocalWorker(tmp_path, token="right-token-123")
    try:
        for settings in (ChannelSettings(), ChannelSettings(token="wrong-token-123")):
            c = WorkerClient(w.address, settings)
            for call in (c.health, c.describe, lambda: c.release("x")):
                with pytest.raises(WorkerCallError) as e:
                    call()
                assert e.value.code == "UNAUTHENTICATED"
        assert WorkerClient(w.address, ChannelSettings(token="right-token-123")).health() == "idle"
    finally:
        w.stop()


def test_a_token_that_starts_with_a_dash_works(tmp_path):
    w = LocalWorker(tmp_path, token="-starts-with-dash")   # secrets.token_urlsafe can produce these
    try:
        assert WorkerClient(w.address, ChannelSettings(token="-starts-with-dash")).health() == "idle"
    finally:
        w.stop()


def test_refusals_are_logged_by_the_worker(tmp_path):
    w = LocalWorker(tmp_path, token="right-token-123")
    try:
        with pytest.raises(WorkerCallError):
            WorkerClient(w.address, ChannelSettings(token="bad-token-000")).health()
    finally:
        w.proc.terminate()
        out = w.proc.stdout.read()
        w.stop()
    assert "refused /mtpdist.v1.Worker/Health: wrong token" in out


def test_worker_without_token_needs_insecure(tmp_path):
    env = {"MTPDIST_CACHE": str(tmp_path), "MTPDIST_CONFIG": str(tmp_path / "cfg"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "mtpdist.cli", "worker", "--port", "0", "--no-advertise"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "--insecure" in p.stderr and "MTPDIST_TOKEN" in p.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_channel(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    w = LocalWorker(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), token="tls-token-1234")
    try:
        ok = WorkerClient(w.address, ChannelSettings(token="tls-token-1234", tls_ca=str(cert)))
        assert ok.health() == "idle"
        with pytest.raises(WorkerCallError) as e:
            WorkerClient(w.address, ChannelSettings(token="tls-token-1234", timeout=3)).health()
        assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        w.stop()


@pytest.mark.parametrize("n", range(1, 9))
def test_ranges_are_contiguous_cover_all_and_proportional(n):
    layers = [10] * 64
    mem = [1000 * (i + 1) for i in range(n)]
    p = plan_layers(mem, layers, headroom=0.1)
    assert p.ranges[0][0] == 0 and p.ranges[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(p.ranges, p.ranges[1:]))
    assert all(e > s for s, e in p.ranges)
    share = [(e - s) / 64 for s, e in p.ranges]
    for s, m in zip(share, mem):
        assert abs(s - m / sum(mem)) <= 1.5 / 64 + 1e-9


def test_headroom_and_refusal_with_arithmetic():
    gib = 1 << 30
    plan_layers([10 * gib, 10 * gib], [gib] * 18, headroom=0.1)          # 18 <= 2 x 9
    with pytest.raises(PlacementError, match=r"(?s)need 19.00 GiB; workers offer 18.00 GiB.*worker 0: 10.00 GiB usable"):
        plan_layers([10 * gib, 10 * gib], [gib] * 19, headroom=0.1)
    with pytest.raises(PlacementError, match="cannot be split across 3 workers"):
        plan_layers([gib] * 3, [1, 1])


def test_uneven_layers_follow_bytes_not_counts():
    p = plan_layers([100, 100], [50, 1, 1, 1, 1, 1, 1, 50], headroom=0.0)
    assert p.ranges == ((0, 4), (4, 8))
    assert plan_layers([300, 100], [1] * 8).ranges == ((0, 6), (6, 8))


def test_worker_id_is_stable_and_a_copied_folder_gets_a_new_one(tmp_path):
    import json

    from mtpdist.security import worker_id
    first = worker_id(tmp_path)
    assert worker_id(tmp_path) == first                      # persisted
    data = json.loads((tmp_path / "worker.json").read_text())
    data["machine"] = "another-mac/0123456789ab"             # as if the folder was copied from elsewhere
    (tmp_path / "worker.json").write_text(json.dumps(data))
    fresh = worker_id(tmp_path)
    assert fresh != first and worker_id(tmp_path) == fresh


def test_placement_balances_stage_time_when_speeds_are_known():
    from mtpdist.placement import plan_layers, stage_seconds
    layers = [100] * 12
    mem = [10_000, 10_000]
    even = plan_layers(mem, layers)
    assert even.ranges == ((0, 6), (6, 12))
    fast_slow = plan_layers(mem, layers, speed=[3.0, 1.0])        # the first Mac reads 3x faster
    assert fast_slow.ranges == ((0, 9), (9, 12))
    t = stage_seconds(fast_slow, [3.0, 1.0])
    assert max(t) == 300 and max(t) < max(stage_seconds(even, [3.0, 1.0]))
    capped = plan_layers([10_000, 560], layers, headroom=0.0, speed=[1.0, 100.0])  # fast but small
    assert capped.ranges == ((0, 7), (7, 12)) and capped.bytes_per_worker[1] <= 560
    with pytest.raises(PlacementError):
        plan_layers([300, 300], layers, headroom=0.0, speed=[1.0, 1.0])
