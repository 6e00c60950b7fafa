"""`mtpdist doctor`: check that this machine can be a worker or a coordinator."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One finding: OK, WARN or FAIL, with details."""
    name: str
    status: str   # OK | WARN | FAIL
    detail: str


def check_versions() -> Check:
    """Installed versions of mtpdist and what it runs on."""
    names = ("mtpdist", "mlx", "mlx-lm", "grpcio", "protobuf", "zeroconf")
    got = {}
    for n in names:
        try:
            got[n] = md.version(n)
        except md.PackageNotFoundError:
            got[n] = None
    missing = [n for n, v in got.items() if v is None and n != "mlx"]
    detail = ", ".join(f"{n} {v or 'missing'}" for n, v in got.items()) + f", Python {platform.python_version()}"
    return Check("versions", "FAIL" if missing else "OK", detail)


def check_backend() -> Check:
    """Whether MLX runs, and on what."""
    try:
        import mlx.core as mx

        from .model.backend import backend_name
        b = backend_name()
        x = mx.ones((64, 64))
        mx.eval(x @ x)
    except Exception as e:  # any import or runtime failure is the finding
        return Check("mlx backend", "FAIL", f"MLX does not run here: {e}")
    status = "OK" if b != "cpu" or platform.system() != "Darwin" else "WARN"
    hint = "" if status == "OK" else " (Metal expected on a Mac: install `mlx`, not `mlx[cpu]`)"
    return Check("mlx backend", status, f"{b}, MLX {mx.__version__}{hint}")


def check_memory() -> Check:
    """Physical memory and what a worker offers by default."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return Check("memory", "WARN", "cannot read physical memory")
    return Check("memory", "OK", f"{total / 2**30:.1f} GiB physical; a worker offers 75% "
                                 f"({0.75 * total / 2**30:.1f} GiB) unless --usable-memory-gb says otherwise")


def check_interfaces() -> Check:
    """Network interfaces and their link kinds."""
    from .discovery import local_links
    links = [(ip, i, k) for ip, i, k in local_links() if k != "loopback"]
    if not links:
        return Check("interfaces", "WARN", "no network interface besides loopback")
    kinds = {k for _, _, k in links}
    status = "WARN" if kinds <= {"wifi", "other"} else "OK"
    hint = " (Wi-Fi only: per-token latency will be high; use Thunderbolt or Ethernet)" if status == "WARN" else ""
    return Check("interfaces", status, ", ".join(f"{i} {ip} ({k})" for ip, i, k in links) + hint)


def check_mdns(interfaces: list[str]) -> Check:
    """Advertise a probe and find it again through real mDNS packets on each interface."""
    from .discovery import Advert, Advertiser, Browser
    from .wire.types import PROTOCOL_VERSION
    cluster = f"doctor-{os.getpid()}"
    ok, bad = [], []
    for ip in interfaces:
        try:
            adv = Advertiser(Advert(f"doctor{os.getpid()}", 9, ((ip, "other"),), PROTOCOL_VERSION, 0, "", "",
                                    cluster, ""), [ip])
            br = Browser([ip], cluster)
            found = br.wait_for(1, 5.0)
            br.close()
            adv.close()
            (ok if found else bad).append(ip)
        except OSError as e:
            bad.append(f"{ip} ({e.strerror})")
    if not interfaces:
        return Check("mdns", "WARN", "no interface to test")
    status = "OK" if not bad else ("WARN" if ok else "FAIL")
    return Check("mdns", status, f"round trip on {', '.join(ok) or 'none'}" + (f"; failed on {', '.join(bad)}" if bad else ""))


def check_port(port: int) -> Check:
    """Whether the worker port is free (and the macOS firewall)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    except OSError as e:
        return Check("worker port", "WARN", f"port {port} is taken ({e.strerror}): a worker already runs, "
                                             "or start one with --port")
    finally:
        s.close()
    detail = f"port {port} is free"
    if platform.system() == "Darwin":
        fw = "/usr/libexec/ApplicationFirewall/socketfilterfw"
        if os.path.exists(fw):
            import subprocess
            state = subprocess.run([fw, "--getglobalstate"], capture_output=True, text=True).stdout.strip()
            detail += f"; {state} (allow Python through it: deploy/macos/setup-thunderbolt-bridge.sh)"
    return Check("worker port", "OK", detail)


def check_token() -> Check:
    """Whether a cluster token is configured."""
    from .security import config_dir
    if os.environ.get("MTPDIST_TOKEN"):
        return Check("token", "OK", "MTPDIST_TOKEN is set")
    f = config_dir() / "token"
    if f.is_file():
        return Check("token", "OK", f"token file {f} (pass --token-file)")
    return Check("token", "WARN", "no cluster token: set MTPDIST_TOKEN or write one to " + str(f))


def check_cache() -> Check:
    """Whether the shard cache is writable and has room."""
    from .model.hashing import cache_dir
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    writable = os.access(d, os.W_OK)
    status = "OK" if writable and free > 2**30 else "WARN"
    return Check("shard cache", status, f"{d}: {'writable' if writable else 'NOT writable'}, {free / 2**30:.1f} GiB free")


def run_doctor(mdns_interfaces: list[str], port: int) -> list[Check]:
    """All checks, each isolated so that one failing check cannot hide the others."""
    from .discovery import local_links
    ifaces = mdns_interfaces or [ip for ip, _, k in local_links() if k != "loopback"] or ["127.0.0.1"]
    checks = [check_versions, check_backend, check_memory, check_interfaces, lambda: check_mdns(ifaces),
              lambda: check_port(port), check_token, check_cache]
    out = []
    for c in checks:
        try:
            out.append(c())
        except Exception as e:  # a broken check is itself a finding, not a crash
            out.append(Check(getattr(c, "__name__", "check"), "FAIL", f"check failed: {e}"))
    return out
