"""Finding workers with mDNS (`_mtpdist._tcp.local.`), and choosing the best link to each.

TXT records carry what placement and compatibility need; parsing and ranking are pure
functions. Zeroconf is bound to chosen interface addresses only (never "all").
"""

from __future__ import annotations

import logging
import platform
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .wire.types import PROTOCOL_VERSION

SERVICE = "_mtpdist._tcp.local."
LINK_RANK = {"thunderbolt": 0, "ethernet": 1, "other": 2, "wifi": 3, "loopback": 4}
log = logging.getLogger("mtpdist.discovery")


@dataclass(frozen=True)
class Advert:
    """What a worker says about itself on mDNS."""

    worker_id: str
    port: int
    links: tuple[tuple[str, str], ...]   # (ip, link kind), e.g. ("169.254.3.2", "thunderbolt")
    protocol: int
    usable_bytes: int
    backend: str
    chip: str
    cluster: str
    version: str

    @property
    def address(self) -> str:
        return f"{preferred_ip(self.links)}:{self.port}"


def txt_record(a: Advert) -> dict[str, str]:
    """The TXT properties advertised for a worker."""
    return {"id": a.worker_id, "proto": str(a.protocol), "mem": str(a.usable_bytes), "backend": a.backend,
            "chip": a.chip[:60], "cluster": a.cluster, "ver": a.version,
            "links": ",".join(f"{ip}={kind}" for ip, kind in a.links)}


def parse_txt(props: dict, port: int, addresses: list[str]) -> Advert:
    """Decode TXT properties (bytes or str); addresses seen in mDNS fill in missing links."""
    p = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else (v or ""))
         for k, v in props.items()}
    links = []
    for item in filter(None, p.get("links", "").split(",")):
        ip, _, kind = item.partition("=")
        links.append((ip, kind if kind in LINK_RANK else "other"))
    known = {ip for ip, _ in links}
    links += [(ip, "loopback" if ip.startswith("127.") else "other") for ip in addresses if ip not in known]
    return Advert(worker_id=p.get("id", ""), port=port, links=tuple(links), protocol=int(p.get("proto", "0") or 0),
                  usable_bytes=int(p.get("mem", "0") or 0), backend=p.get("backend", ""), chip=p.get("chip", ""),
                  cluster=p.get("cluster", "default"), version=p.get("ver", ""))


def preferred_ip(links) -> str:
    """Thunderbolt bridge over Ethernet over Wi-Fi; loopback last."""
    if not links:
        raise ValueError("worker advertised no addresses")
    return min(links, key=lambda link: (LINK_RANK.get(link[1], 2), link[0]))[0]


def classify(ifname: str, wireless: bool = False, hardware_port: str = "") -> str:
    """Link kind of one interface from its name and what the OS says about it."""
    hp = hardware_port.lower()
    if ifname == "lo" or ifname.startswith("lo0"):
        return "loopback"
    if "thunderbolt" in hp or ifname.startswith(("thunderbolt", "tbt")):
        return "thunderbolt"
    if wireless or "wi-fi" in hp or "wifi" in hp or "airport" in hp:
        return "wifi"
    if "ethernet" in hp or ifname.startswith(("en", "eth")):
        return "ethernet"
    if ifname.startswith("bridge"):  # macOS puts Thunderbolt ports in bridge0
        return "thunderbolt"
    return "other"


def parse_networksetup(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {device: hardware port name}."""
    out, port = {}, ""
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:"):
            out[line.split(":", 1)[1].strip()] = port
    return out


def local_links() -> list[tuple[str, str, str]]:
    """(ip, interface, kind) for this machine's IPv4 addresses."""
    import ifaddr
    ports = {}
    if platform.system() == "Darwin":
        try:
            ports = parse_networksetup(subprocess.run(["networksetup", "-listallhardwareports"],
                                                      capture_output=True, text=True, timeout=5).stdout)
        except (OSError, subprocess.TimeoutExpired):
            pass
    out = []
    for adapter in ifaddr.get_adapters():
        wireless = Path(f"/sys/class/net/{adapter.nice_name}/wireless").exists()
        kind = classify(adapter.nice_name, wireless, ports.get(adapter.nice_name, ""))
        out += [(ip.ip, adapter.nice_name, kind) for ip in adapter.ips if isinstance(ip.ip, str)]
    return out


def links_for(bind_ips: list[str]) -> tuple[tuple[str, str], ...]:
    """The (ip, kind) pairs to advertise for the addresses mDNS is bound to."""
    kinds = {ip: kind for ip, _, kind in local_links()}
    return tuple((ip, kinds.get(ip, "loopback" if ip.startswith("127.") else "other")) for ip in bind_ips)


class Advertiser:
    """Registers one worker's service on the given interfaces until closed."""

    def __init__(self, advert: Advert, interfaces: list[str]):
        from zeroconf import ServiceInfo, Zeroconf
        self.zc = Zeroconf(interfaces=interfaces)
        name = f"mtpdist-{advert.worker_id}.{SERVICE}"
        self.info = ServiceInfo(SERVICE, name, port=advert.port, properties=txt_record(advert),
                                addresses=[socket.inet_aton(ip) for ip, _ in advert.links],
                                server=f"mtpdist-{advert.worker_id}.local.")
        self.zc.register_service(self.info, allow_name_change=True)

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


class Browser:
    """Keeps the set of compatible workers of one cluster seen on mDNS."""

    def __init__(self, interfaces: list[str], cluster: str = "default"):
        from zeroconf import ServiceBrowser, Zeroconf
        self.cluster = cluster
        self.zc = Zeroconf(interfaces=interfaces)
        self.found: dict[str, Advert] = {}
        self.ignored: dict[str, str] = {}
        self.resolving: set[str] = set()  # adverts seen whose details are still being asked for
        self.changed = threading.Condition()
        self.browser = ServiceBrowser(self.zc, SERVICE, handlers=[self._on_change])

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        from zeroconf import ServiceStateChange
        if state_change is ServiceStateChange.Removed:
            with self.changed:
                self.found.pop(name, None)
                self.changed.notify_all()
            return
        with self.changed:
            self.resolving.add(name)
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
        except Exception:  # noqa: BLE001 - the browser was closed while this lookup ran
            return
        finally:
            with self.changed:
                self.resolving.discard(name)
        if info is None:
            return
        ad = parse_txt(info.properties, info.port, info.parsed_addresses())
        reason = None
        if ad.cluster != self.cluster:
            reason = f"cluster {ad.cluster!r}, not {self.cluster!r}"
        elif ad.protocol != PROTOCOL_VERSION:
            reason = f"protocol {ad.protocol}, this coordinator speaks {PROTOCOL_VERSION} (upgrade mtpdist)"
        with self.changed:
            if reason:
                if self.ignored.get(name) != reason:
                    log.warning("ignoring worker %s at %s: %s", ad.worker_id, ad.address, reason)
                self.ignored[name] = reason
                self.found.pop(name, None)
            else:
                self.found[name] = ad
            self.changed.notify_all()

    def name_of(self, address: str) -> str | None:
        """The mDNS service name advertising `address`, if any."""
        with self.changed:
            return next((name for name, ad in self.found.items() if ad.address == address), None)

    def workers(self) -> list[Advert]:
        with self.changed:
            return sorted(self.found.values(), key=lambda a: a.worker_id)

    def wait_for(self, n: int, timeout: float) -> list[Advert]:
        """Block until n workers are known or the timeout passes; returns who was found."""
        end = time.monotonic() + timeout
        with self.changed:
            while len(self.found) < n and (left := end - time.monotonic()) > 0:
                self.changed.wait(left)
        return self.workers()

    def close(self) -> None:
        self.zc.close()
