"""`mtpdist worker`: serve a slice of a model's layers over gRPC."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from mtpdist.model.hashing import cache_dir
from mtpdist.wire.server import serve

from .service import WorkerService


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; use the Thunderbolt/Ethernet address to serve peers)")
    p.add_argument("--port", type=int, default=50551, help="gRPC port (0 picks a free one)")
    p.add_argument("--model-dir", default=None, help="a local copy of the model; used when its content hash matches")
    p.add_argument("--cache-dir", default=None, help=f"where streamed shards are kept (default {cache_dir()})")
    p.add_argument("--usable-memory-gb", type=float, default=None,
                   help="memory offered for weights and state (default 75%% of RAM)")
    p.add_argument("--max-sequences", type=int, default=64, help="live sequences before the oldest is evicted")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline (s) for calls to the next worker")


def run_worker(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = WorkerService(
        cache_root=Path(args.cache_dir) if args.cache_dir else cache_dir(),
        model_dir=Path(args.model_dir) if args.model_dir else None,
        usable_bytes=int(args.usable_memory_gb * (1 << 30)) if args.usable_memory_gb else None,
        max_sequences=args.max_sequences, rpc_timeout=args.rpc_timeout)
    server, port = serve(service, args.host, args.port)
    print(f"mtpdist worker {service.worker_id} listening on {args.host}:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="mtpdist worker")
    add_arguments(ap)
    sys.exit(run_worker(ap.parse_args()))
