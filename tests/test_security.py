"""Issue #10's attacks, tried again against real processes on loopback: a rogue advert, a
tampered cache, an unplanned next hop, an oversized Forward, wrong secrets, failed loads."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import mlx.core as mx
import pytest

from mtpdist.coordinator.local_cluster import LocalCluster, LocalWorker
from mtpdist.coordinator.session import FORWARD_TOKEN_MARGIN, PipelineSession
from mtpdist.wire.activations import to_activation
from mtpdist.coordinator.shards import ShardSource
from mtpdist.errors import MtpdistError, WorkerCallError
from mtpdist.security import node_identity
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import ForwardCall, ShardSpec

from helpers import plain_greedy

SECRET = "cluster-secret-for-tests"
ROGUE = Path(__file__).with_name("rogue.py")
PROMPT = [5, 17, 99, 3, 42, 8]


def fwd(seq: str, h, next: tuple[str, ...] = ()) -> ForwardCall:
    """One sequence's first Forward (through ForwardCall.single where the batched protocol has it)."""
    single = getattr(ForwardCall, "single", None)
    return single(seq, 0, h, next=next) if single else ForwardCall(seq, 0, h, next=next)


def channel(secret: str = SECRET, **kw) -> ChannelSettings:
    return ChannelSettings(identity=node_identity(secret), **kw)


def weight_sample(model: Path) -> bytes:
    """64 bytes from the middle of the first layer's first tensor, as they would travel."""
    src = ShardSource(model, 0, 1)
    first = next(src.chunks())
    src.ckpt.close()
    return first[len(first) // 2: len(first) // 2 + 64]


def test_rogue_clone_of_a_worker_gets_nothing_and_real_workers_serve(tmp_path, tiny_dense):
    import httpx
    import openai

    from servers import Coordinator
    cluster = f"t{uuid.uuid4().hex[:6]}"
    model = tiny_dense[0]
    local = json.loads(subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(model),
                                       "--prompt", "import os", "--max-tokens", "8", "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    real = LocalCluster(2, tmp_path, "--cluster", cluster, token=SECRET, advertise=True)
    rogue = subprocess.Popen([sys.executable, str(ROGUE), cluster, "a-guess-at-the-secret"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    c = None
    try:
        _, port, name = rogue.stdout.readline().split()
        rogue_address = f"127.0.0.1:{port}"
        c = Coordinator("--model", str(model), "--token", SECRET, "--workers", "2", "--discover-timeout", "20",
                        "--cluster", cluster, "--mdns-interface", "127.0.0.1")
        client = openai.OpenAI(base_url=c.url, api_key="x", max_retries=0)
        got = client.completions.create(model="m", prompt="import os", max_tokens=8, temperature=0)
        assert got.choices[0].text == local["text"]                   # served, correctly, by the real workers
        rows = httpx.get(c.url + "/cluster").json()["workers"]
        assert sorted(r["address"] for r in rows) == sorted(real.addresses)
        refusals = [ln for ln in c.lines if "refusing" in ln]
        assert len(refusals) == 1 and f"worker {name} at {rogue_address}" in refusals[0]
        rogue.stdin.write("dump\n")
        rogue.stdin.flush()
        seen = json.loads(rogue.stdout.readline())
        raw, plain = base64.b64decode(seen["raw"]), base64.b64decode(seen["plain"])
        assert seen["connections"] >= 1 and raw[:1] == b"\x16"        # it was dialed: a TLS ClientHello, no more
        assert plain == b""                                           # no request got through its TLS
        assert SECRET.encode() not in raw and b"mtpdist.v1" not in raw and weight_sample(model) not in raw
        # The recorder would have caught a request: a client that trusts the rogue's CA sends one.
        with pytest.raises(WorkerCallError):
            WorkerClient(rogue_address, channel("a-guess-at-the-secret", timeout=3)).describe()
        rogue.stdin.write("dump\n")
        rogue.stdin.flush()
        assert b"/mtpdist.v1.Worker/Describe" in base64.b64decode(json.loads(rogue.stdout.readline())["plain"])
    finally:
        if c:
            c.stop()
        rogue.communicate("", timeout=10)
        real.stop()


class Relay:
    """A TCP relay that records what the client sends (a wiretap between coordinator and worker)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target, self.seen = (host, int(port)), bytearray()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            c, _ = self.sock.accept()
            u = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, a, b, record):
        try:
            while data := a.recv(65536):
                if record:
                    self.seen.extend(data)
                b.sendall(data)
        except OSError:
            pass


@pytest.mark.parametrize("secure", [True, False])
def test_wiretap_sees_no_secret_weights_or_requests_with_mtls(secure, tmp_path, tiny_dense):
    model = tiny_dense[0]
    w = LocalWorker(tmp_path, token=SECRET if secure else None)
    tap = Relay(w.address)
    try:
        s = PipelineSession(model, [tap.address], progress=False, channel=channel() if secure else ChannelSettings())
        plain_greedy(s.parts, PROMPT, 4, backend=s)
        s.close()
    finally:
        w.stop()
    sample = weight_sample(model)
    if secure:
        assert SECRET.encode() not in tap.seen and b"mtpdist.v1" not in tap.seen and sample not in tap.seen
        assert len(tap.seen) > 10_000                 # the shard did go through, encrypted
    else:                                             # the control: a plaintext link shows everything
        assert b"mtpdist.v1.Worker/LoadShard" in tap.seen and sample in tap.seen


def test_workers_serve_only_callers_holding_the_secret(tmp_path):
    w = LocalWorker(tmp_path, token=SECRET)
    try:
        assert WorkerClient(w.address, channel()).health() == "idle"
        for settings in (ChannelSettings(timeout=3), channel("another-secret-123", timeout=3)):
            c = WorkerClient(w.address, settings)
            for call in (c.health, c.describe, lambda: c.release("x")):
                with pytest.raises(WorkerCallError) as e:
                    call()
                assert e.value.code == "UNAVAILABLE"
    finally:
        w.stop()


def test_a_secret_that_starts_with_a_dash_works(tmp_path):
    w = LocalWorker(tmp_path, token="-starts-with-dash")   # secrets.token_urlsafe can produce these
    try:
        assert WorkerClient(w.address, channel("-starts-with-dash")).health() == "idle"
    finally:
        w.stop()


def _generate(model, *args):
    return subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(model), "--prompt", "x",
                           "--max-tokens", "2", "--json", *args], capture_output=True, text=True, timeout=120)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("mtpdist: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_wrong_secret_on_either_side_is_one_line_naming_the_peer(tmp_path, tiny_dense):
    good = LocalWorker(tmp_path / "g", token=SECRET)
    odd = LocalWorker(tmp_path / "o", token="not-the-cluster-secret")
    try:
        p = _generate(tiny_dense[0], "--worker", good.address, "--token", "coordinator-has-it-wrong")
        assert p.returncode == 2 and good.address in _error_line(p.stderr) and "secret" in _error_line(p.stderr)
        p = _generate(tiny_dense[0], "--worker", odd.address, "--token", SECRET)
        assert p.returncode == 2 and odd.address in _error_line(p.stderr) and "secret" in _error_line(p.stderr)
        p = _generate(tiny_dense[0], "--worker", odd.address, "--worker", good.address, "--token", SECRET)
        assert p.returncode == 0, p.stderr                       # the odd one is refused, the good one serves
        assert f"refusing worker at {odd.address}" in p.stderr
        st = subprocess.run([sys.executable, "-m", "mtpdist.cli", "status", "--worker", odd.address, "--worker",
                             good.address, "--token", SECRET, "--json"], capture_output=True, text=True, timeout=60)
        rows = {r["address"]: r for r in json.loads(st.stdout)["workers"]}
        assert st.returncode == 1 and "did not prove it holds the cluster secret" in rows[odd.address]["error"]
        assert "error" not in rows[good.address]
    finally:
        good.stop()
        odd.stop()


def test_unplanned_next_hop_is_refused_and_nothing_is_dialed(tmp_path, tiny_dense):
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(1.0)
    with LocalCluster(2, tmp_path, token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel())
        first = WorkerClient(ws.addresses[0], channel())
        h = to_activation(mx.zeros((2, 64)))
        assert first.forward(fwd("ok", h, next=(ws.addresses[1],))).hidden.shape == h.shape   # the planned route
        for hops in ((trap.getsockname()[0] + f":{trap.getsockname()[1]}",), (ws.addresses[1], "10.9.9.9:1")):
            with pytest.raises(WorkerCallError) as e:
                first.forward(fwd("bad", h, next=hops))
            assert e.value.code == "PERMISSION_DENIED" and "not a planned worker" in e.value.details
        with pytest.raises(socket.timeout):
            trap.accept()                                 # nothing was dialed
        with pytest.raises(WorkerCallError) as e:         # the last stage has no planned next hop at all
            WorkerClient(ws.addresses[1], channel()).forward(fwd("x", h, next=(ws.addresses[0],)))
        assert e.value.code == "PERMISSION_DENIED"
        s.attach(ws.addresses[:1])                        # re-planned onto one worker: its route is now empty
        with pytest.raises(WorkerCallError) as e:
            first.forward(fwd("again", h, next=(ws.addresses[1],)))
        assert e.value.code == "PERMISSION_DENIED"
        s.close()
    trap.close()


def test_tokens_per_forward_are_bounded_before_any_compute(tmp_path, tiny_dense):
    with LocalCluster(1, tmp_path, token=SECRET) as ws:
        s = PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel(), prefill_step=8)
        c = WorkerClient(ws.addresses[0], channel())
        limit = s.forward_token_limit()
        assert limit == 8 + FORWARD_TOKEN_MARGIN
        with pytest.raises(WorkerCallError) as e:
            c.forward(fwd("big", to_activation(mx.zeros((limit + 1, 64)))))
        assert e.value.code == "INVALID_ARGUMENT" and f"at most {limit} tokens" in e.value.details
        assert c.describe().sequences == 0                # refused before any state was made
        assert c.forward(fwd("fits", to_activation(mx.zeros((limit, 64))))).hidden.shape == (limit, 64)
        s.close()


def _tensor_offset(shard: Path, name: str) -> int:
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n + json.loads(f.read(n))[name]["data_offsets"][0]


def test_tampered_cached_shard_is_refused_deleted_and_sent_again(tmp_path, tiny_dense, caplog):
    model = tiny_dense[0]
    w = LocalWorker(tmp_path, token=SECRET)
    s = PipelineSession(model, [w.address], progress=False, channel=channel())
    want = plain_greedy(s.parts, PROMPT, 6, backend=s)
    s.close()
    w.stop()
    shard = tmp_path / "shards" / s.model_hash / "0-8" / "model.safetensors"
    original = shard.read_bytes()
    name = sorted(json.loads(original[8:8 + int.from_bytes(original[:8], "little")]))[0]
    off = _tensor_offset(shard, name)
    with open(shard, "r+b") as f:                         # flip the sign of the tensor's first float
        f.seek(off + 3)
        b = f.read(1)
        f.seek(off + 3)
        f.write(bytes([b[0] ^ 0x80]))
    stale = shard.parent.parent / "3-4.partial"           # as if a worker had been killed mid-stream
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    w = LocalWorker(tmp_path, token=SECRET)               # restarted: it would load from its cache
    try:
        assert not stale.exists()                         # a restart cleans partial shards
        with caplog.at_level(logging.WARNING, logger="mtpdist.coordinator"):
            s = PipelineSession(model, [w.address], progress=False, channel=channel())
        resend = [r.getMessage() for r in caplog.records if "sending them again" in r.getMessage()]
        assert len(resend) == 1 and w.address in resend[0] and f"tensor {name} does not match its sha256" in resend[0]
        assert plain_greedy(s.parts, PROMPT, 6, backend=s) == want
        assert shard.read_bytes() == original             # the cache holds the true bytes again
        s.close()
    finally:
        w.proc.terminate()
        log = w.proc.stdout.read()
        w.stop()
    assert "failed the content check" in log and "deleted" in log


def test_stream_with_wrong_bytes_is_refused_and_the_old_shard_kept(tmp_path, tiny_dense):
    model = tiny_dense[0]
    with LocalCluster(1, tmp_path, token=SECRET) as ws:
        s = PipelineSession(model, ws.addresses, progress=False, channel=channel())
        c = WorkerClient(ws.addresses[0], channel())
        held = c.describe()
        src = ShardSource(model, 2, 5)
        spec = ShardSpec(s.model_hash, 2, 5, json.dumps(s.raw_config), src.manifest(s.model_hash))

        def flipped():
            for i, chunk in enumerate(src.chunks()):
                yield bytes([chunk[0] ^ 0x80]) + chunk[1:] if i == 0 else chunk
        with pytest.raises(WorkerCallError) as e:
            c.load_shard(spec, flipped())
        assert e.value.code == "DATA_LOSS" and "does not match its sha256 as received" in e.value.details
        store = tmp_path / "w0" / "shards" / s.model_hash
        assert sorted(p.name for p in store.iterdir()) == ["0-8"]       # nothing kept, no .partial left
        bad_config = ShardSpec(s.model_hash, 2, 5, '{"model_type": "llama"', spec.tensors)
        with pytest.raises(WorkerCallError) as e:
            c.load_shard(bad_config, ShardSource(model, 2, 5).chunks())
        assert e.value.code == "INVALID_ARGUMENT" and "config_json" in e.value.details
        wrong_shapes = dict(s.raw_config)                                # parses, but the weights will not fit
        wrong_shapes["text_config"] = dict(wrong_shapes.get("text_config", wrong_shapes), hidden_size=96)
        bad_load = ShardSpec(s.model_hash, 2, 5, json.dumps(wrong_shapes), spec.tensors)
        with pytest.raises(WorkerCallError) as e:
            c.load_shard(bad_load, ShardSource(model, 2, 5).chunks())
        assert e.value.code == "INVALID_ARGUMENT" and "cannot load shard" in e.value.details
        assert not (store / "2-5").exists()                             # the shard that cannot load is not cached
        after = c.describe()                                             # and the live shard is still there
        assert (after.layer_start, after.layer_end, after.shard_digest) == (0, 8, held.shard_digest)
        assert c.forward(fwd("still", to_activation(mx.zeros((2, 64))))).hidden.shape == (2, 64)
        s.close()


def test_cache_is_capped_least_recently_used_first(tmp_path, tiny_dense):
    model = tiny_dense[0]
    cap = ShardSource(model, 0, 8).nbytes + ShardSource(model, 0, 4).nbytes + 65536   # 0-8 and 0-4, no more
    with LocalCluster(1, tmp_path, "--cache-max-gb", f"{cap / 1e9:.9f}", token=SECRET) as ws:
        s = PipelineSession(model, ws.addresses, progress=False, channel=channel())   # caches 0-8
        c = WorkerClient(ws.addresses[0], channel())
        store = tmp_path / "w0" / "shards" / s.model_hash

        def load(a, b):
            src = ShardSource(model, a, b)
            spec = ShardSpec(s.model_hash, a, b, json.dumps(s.raw_config), src.manifest(s.model_hash))
            return c.load_shard(spec, src.chunks()).source
        assert load(0, 4) == "stream"
        assert sorted(p.name for p in store.iterdir()) == ["0-4", "0-8"]
        assert load(4, 8) == "stream"                    # over the cap: 0-8, the least recently used, goes
        assert sorted(p.name for p in store.iterdir()) == ["0-4", "4-8"]
        assert load(0, 4) == "cache"                     # 0-4 is now the most recently used
        assert load(0, 8) == "stream"                    # so 4-8 goes this time
        assert sorted(p.name for p in store.iterdir()) == ["0-4", "0-8"]
        s.close()


def test_insecure_is_loopback_only_and_the_bind_line_tells_the_truth(tmp_path):
    env = {"MTPDIST_CACHE": str(tmp_path), "MTPDIST_CONFIG": str(tmp_path / "cfg"), "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "mtpdist.cli", "worker", "--port", "0", "--no-advertise"]
    p = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "--insecure" in p.stderr and "MTPDIST_TOKEN" in p.stderr
    p = subprocess.run(base + ["--insecure"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "0.0.0.0" in p.stderr and "not loopback" in p.stderr
    p = _generate(Path("."), "--worker", "10.1.2.3:50551", "--insecure")
    assert p.returncode == 2 and "10.1.2.3:50551" in _error_line(p.stderr)
    with pytest.raises(MtpdistError, match="not on loopback"):     # a discovered worker on a network, too
        WorkerClient("10.1.2.3:50551", ChannelSettings())
    WorkerClient("10.1.2.3:50551", ChannelSettings(plaintext_network=True)).close()   # the explicit override
    w = LocalWorker(tmp_path, "--allow-insecure-network", host="0.0.0.0")
    try:
        assert "listening on 0.0.0.0:" in w.log[-1] and "every interface" in w.log[-1] and "plaintext" in w.log[-1]
    finally:
        w.stop()
    w = LocalWorker(tmp_path, host="0.0.0.0", token=SECRET)
    try:
        assert "every interface" in w.log[-1] and "mutual TLS" in w.log[-1]
        assert WorkerClient(w.address, channel()).health() == "idle"
    finally:
        w.stop()


def test_no_worker_with_the_secret_is_a_clear_error(tmp_path, tiny_dense):
    with LocalCluster(1, tmp_path, token=SECRET) as ws:
        with pytest.raises(MtpdistError, match=r"none of 1 worker\(s\) proved it holds this cluster's secret"):
            PipelineSession(tiny_dense[0], ws.addresses, progress=False, channel=channel("wrong-secret-999"))
        p = _generate(tiny_dense[0], "--worker", ws.addresses[0], "--insecure")   # plaintext to a TLS worker
        assert p.returncode == 2 and ws.addresses[0] in _error_line(p.stderr) and "mutual TLS" in p.stderr
