"""`mtpdist worker`: serve a slice of a model's layers over gRPC and advertise on mDNS."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from mtpdist import __version__
from mtpdist.discovery import Advert, Advertiser, links_for, local_links
from mtpdist.errors import MtpdistError
from mtpdist.model.hashing import cache_dir
from mtpdist.security import add_security_arguments, check_insecure_hosts, resolve_identity, worker_id
from mtpdist.wire.client import ChannelSettings
from mtpdist.wire.server import serve
from mtpdist.wire.sockets import listen_links
from mtpdist.wire.types import PROTOCOL_VERSION

from .compute import StageEmulation
from .host import host_id, offer
from .service import WorkerService

log = logging.getLogger("mtpdist.worker")


def add_arguments(p) -> None:
    """Flags of `mtpdist worker`."""
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all; needs the cluster secret)")
    p.add_argument("--port", type=int, default=50551, help="gRPC port (0 picks a free one)")
    p.add_argument("--model-dir", default=None, help="a local copy of the model; used when its content hash matches")
    p.add_argument("--cache-dir", default=None, help=f"where streamed shards are kept (default {cache_dir()})")
    p.add_argument("--cache-max-gb", type=float, default=None,
                   help="cap on cached shards; least recently used go first (default: twice the usable memory)")
    p.add_argument("--usable-memory-gb", type=float, default=None,
                   help="memory offered for weights and state (default: --memory-share of RAM). Workers on one "
                        "machine share its budget in placement, so a second local worker needs no flag")
    p.add_argument("--memory-share", type=float, default=None, metavar="F",
                   help="fraction of this machine's RAM offered (default 0.75); workers of one machine together "
                        "never get more than 0.75 of it, or the largest single offer")
    p.add_argument("--max-sequences", type=int, default=64, help="live sequences before the oldest is evicted")
    p.add_argument("--sequence-ttl", type=float, default=600.0,
                   help="drop a sequence unused this many seconds (its coordinator crashed, or its release was "
                        "lost; default 600)")
    p.add_argument("--prefix-ttl", type=float, default=3600.0,
                   help="drop a kept prefix (a finished turn later requests may continue from) neither kept nor "
                        "used this many seconds (its coordinator crashed; default 3600)")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline (s) for calls to the next worker")
    p.add_argument("--cluster", default="default", help="cluster name advertised on mDNS (default 'default')")
    p.add_argument("--no-advertise", action="store_true", help="do not advertise on mDNS")
    p.add_argument("--grpc-links", action="store_true",
                   help="carry the ring's units over gRPC streams only (no socket link port; slower)")
    p.add_argument("--link-port", type=int, default=0,
                   help="port of the ring's socket links (mutual TLS like --port; default: any free port)")
    p.add_argument("--mdns-interface", action="append", default=[], metavar="IP",
                   help="advertise on this interface address only (repeatable; default: the listen address, "
                        "or every non-loopback IPv4 address when listening on all)")
    p.add_argument("--emulate-ms", default=None, metavar="A,B", type=_emulation,
                   help="benchmarking aid: make a forward of T rows take at least A + B*(T-1) ms (compute, then "
                        "sleep), to play a Mac-speed stage on a small machine. Off by default; figures made "
                        "with it are emulated")
    p.add_argument("--read-gbps", type=float, default=None,
                   help="this Mac's weight-read speed in GB/s, for placement (default: measured at first contact)")
    add_security_arguments(p)


def _emulation(text: str) -> StageEmulation:
    import argparse
    try:
        return StageEmulation.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def mdns_interfaces(host: str, chosen: list[str]) -> list[str]:
    """Where to advertise: the chosen addresses, the listen address, or every non-loopback one."""
    if chosen:
        return chosen
    if host not in ("0.0.0.0", "::"):
        return [host]
    return [ip for ip, _, kind in local_links() if kind != "loopback"] or ["127.0.0.1"]


def check_port_free(host: str, port: int) -> None:
    """Fail with one line when the port is taken (before gRPC tries, and logs its own lines)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise MtpdistError(f"cannot listen on {host}:{port}: {e.strerror} (another worker on this port?); "
                               "pick another with --port") from None


def run_worker(args) -> int:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    identity = resolve_identity(args.token, args.token_file, args.insecure, role="worker")
    if identity is None:
        check_insecure_hosts([args.host], args.allow_insecure_network, "would listen on")
    service = WorkerService(
        cache_root=Path(args.cache_dir) if args.cache_dir else cache_dir(),
        model_dir=Path(args.model_dir) if args.model_dir else None,
        usable_bytes=int(args.usable_memory_gb * (1 << 30)) if args.usable_memory_gb else None,
        max_sequences=args.max_sequences, worker_id=worker_id(),
        channel=ChannelSettings(identity=identity, plaintext_network=args.allow_insecure_network,
                                timeout=args.rpc_timeout),
        cache_max_bytes=int(args.cache_max_gb * 1e9) if args.cache_max_gb is not None else None,
        emulate=args.emulate_ms, read_gbps=args.read_gbps)
    check_port_free(args.host, args.port)
    try:
        server, port = serve(service, args.host, args.port, identity=identity)
    except OSError as e:  # the port is taken: one line, not a traceback
        raise MtpdistError(str(e)) from None
    # Several workers may share a machine (and its config folder): one id per port, and the
    # machine's identity in Describe, so the coordinator never takes them for one worker and
    # places them within one shared memory budget.
    service.worker_id = f"{service.worker_id}-{port}"
    if not args.grpc_links:
        service.link_port = listen_links(service, args.host, identity, args.link_port)
    service.host_id = host_id()
    service.measure_read_speed()
    if service.memory:
        try:
            service.usable = offer(service.usable if args.usable_memory_gb else None, service.memory,
                                   args.memory_share)
        except MtpdistError:
            server.stop(None)
            raise
    if args.emulate_ms:
        log.warning("emulating a stage of %g + %g ms per extra row (benchmarking aid)",
                    args.emulate_ms.a_ms, args.emulate_ms.b_ms)
    if identity is None:
        log.warning("running without a cluster secret (--insecure): plaintext, no authentication")
    else:
        log.info("mutual TLS; cluster CA %s (the same on every Mac with this secret)", identity.fingerprint)
    advertiser = None
    if not args.no_advertise:
        ifaces = mdns_interfaces(args.host, args.mdns_interface)
        from mtpdist.model.backend import backend_name
        import platform
        advertiser = Advertiser(Advert(
            worker_id=service.worker_id, port=port, links=links_for(ifaces), protocol=PROTOCOL_VERSION,
            usable_bytes=service.usable, backend=backend_name(), chip=platform.processor() or platform.machine(),
            cluster=args.cluster, version=__version__), ifaces)
        log.info("advertising on mDNS (%s) in cluster %r", ", ".join(ifaces), args.cluster)
    print(f"mtpdist worker {service.worker_id} listening on {args.host}:{port}"
          + (" (every interface)" if args.host in ("0.0.0.0", "::") else "")
          + (" with mutual TLS" if identity else " in plaintext (--insecure)"), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=_expire_loop, args=(service, args.sequence_ttl, done, args.prefix_ttl),
                     daemon=True).start()
    done.wait()
    if advertiser:
        advertiser.close()
    server.stop(grace=2).wait()
    return 0


def _expire_loop(service: WorkerService, ttl: float, done: threading.Event, prefix_ttl: float = 0) -> None:
    """Drop sequences idle for longer than `ttl` and kept prefixes unused for longer than
    `prefix_ttl` (orphans of a crashed coordinator, or of releases that never landed)."""
    ttls = [t for t in (ttl, prefix_ttl) if t > 0]
    if not ttls:
        return
    while not done.wait(min(max(min(ttls) / 4, 0.25), 30.0)):
        try:
            gone = service.expire_idle(ttl) if ttl > 0 else []
            kept = service.expire_prefixes(prefix_ttl) if prefix_ttl > 0 else []
        except Exception:  # never let housekeeping take the worker down
            log.exception("expiring idle sequences failed")
            continue
        if gone:
            log.info("dropped %d sequence(s) idle for more than %g s", len(gone), ttl)
        if kept:
            log.info("dropped %d kept prefix(es) unused for more than %g s", len(kept), prefix_ttl)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="mtpdist worker")
    add_arguments(ap)
    sys.exit(run_worker(ap.parse_args()))
