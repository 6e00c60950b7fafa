#!/usr/bin/env python3
"""Per-hop cost of authentication and encryption: the same forwards through 2 local workers,
plaintext (--insecure) vs mutual TLS from a cluster secret, interleaved; writes JSON.

  python scripts/bench_security.py --model mtpdist/demo_model --out benchmarks/security-2workers.json

A hop is one coordinator->worker or worker->worker leg (request and reply); with 2 workers
in a chain a forward makes 2 hops. Overhead = forward wall time - worker compute time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import mlx.core as mx

from mtpdist.coordinator.local_cluster import LocalCluster
from mtpdist.coordinator.session import PipelineSession
from mtpdist.wire.activations import to_activation
from mtpdist.wire.types import ForwardCall
from mtpdist.security import node_identity
from mtpdist.wire.client import ChannelSettings, WorkerClient

SECRET = "bench-cluster-secret"


def overhead_us(session, hidden: mx.array) -> float:
    """Wall minus compute of one forward of a fresh sequence through the chain, in microseconds."""
    act = to_activation(hidden[0])
    call = ForwardCall.single(uuid.uuid4().hex, 0, act, next=tuple(session.addresses[1:]))
    t = time.perf_counter()
    r = session.clients[0].forward(call)
    wall = (time.perf_counter() - t) * 1e6
    session.transport().release([call.sequences[0].sequence_id])
    return wall - sum(r.compute_us)


def handshake_ms(address: str, settings: ChannelSettings) -> float:
    """A fresh channel's first call (TCP connect, TLS handshake when secure, one Health)."""
    c = WorkerClient(address, settings)
    t = time.perf_counter()
    c.health()
    ms = (time.perf_counter() - t) * 1e3
    c.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mtpdist/demo_model")
    ap.add_argument("--steps", type=int, default=150, help="1- and 2-token forwards per mode and round")
    ap.add_argument("--chunks", type=int, default=6, help="prefill-sized forwards per mode and round")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    modes = {"plaintext": (None, ChannelSettings()),
             "mtls": (SECRET, ChannelSettings(identity=node_identity(SECRET, "coordinator")))}
    tmp = tempfile.TemporaryDirectory()
    clusters, sessions, load_s = {}, {}, {}
    try:
        for name, (secret, settings) in modes.items():
            clusters[name] = LocalCluster(2, Path(tmp.name) / name, token=secret)
            t = time.perf_counter()
            sessions[name] = PipelineSession(args.model, clusters[name].addresses, progress=False, channel=settings,
                                             prefill_step=args.chunk)
            load_s[name] = time.perf_counter() - t
        hidden_size = sessions["plaintext"].parts.config.hidden_size
        res = {name: {"1": [], "2": [], str(args.chunk): [], "handshake_ms": []} for name in modes}
        for _ in range(args.rounds):
            for name, (_, settings) in modes.items():     # interleaved: both modes see the same machine noise
                s = sessions[name]
                for _ in range(5):
                    res[name]["handshake_ms"].append(handshake_ms(s.addresses[0], settings))
                for n in (1, 2):
                    h = mx.random.normal((1, n, hidden_size))
                    res[name][str(n)] += [overhead_us(s, h) for _ in range(args.steps)]
                for _ in range(args.chunks):
                    res[name][str(args.chunk)].append(overhead_us(s, mx.random.normal((1, args.chunk, hidden_size))))
        hops = 2
        out = {"model": args.model, "workers": 2, "hops_per_forward": hops, "machine": platform.platform(),
               "per_hop_overhead_us": {}, "first_call_ms": {}, "first_attach_s": {k: round(v, 3) for k, v in load_s.items()},
               "activation_bytes_per_token": len(to_activation(mx.zeros((1, hidden_size))).data)}
        for name in modes:
            out["per_hop_overhead_us"][name] = {f"{k}_tokens": round(statistics.median(v) / hops)
                                                for k, v in res[name].items() if k != "handshake_ms"}
            out["first_call_ms"][name] = round(statistics.median(res[name]["handshake_ms"]), 2)
        out["mtls_extra_per_hop_us"] = {k: out["per_hop_overhead_us"]["mtls"][k] - out["per_hop_overhead_us"]["plaintext"][k]
                                        for k in out["per_hop_overhead_us"]["mtls"]}
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    finally:
        for s in sessions.values():
            s.close()
        for c in clusters.values():
            c.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
