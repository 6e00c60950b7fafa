"""Which workers form the pipeline: static addresses plus those found on mDNS."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mtpdist.discovery import Advert, Browser, local_links
from mtpdist.errors import MtpdistError

log = logging.getLogger("mtpdist.coordinator")


@dataclass(frozen=True)
class ClusterOptions:
    """How the coordinator finds its workers (flags of generate/coordinator/status)."""
    workers: int = 0                       # wait for this many in all (static + discovered)
    static: tuple[str, ...] = ()           # --worker HOST:PORT, in pipeline order, first
    cluster: str = "default"
    mdns_interfaces: tuple[str, ...] = ()  # default: every non-loopback IPv4 address
    discover_timeout: float = 15.0

    settle: float = 2.0                    # with workers=0: after the first, wait this long for more

    @property
    def discover(self) -> bool:
        return self.workers > len(self.static) or not self.static


def default_interfaces() -> list[str]:
    """This machine's non-loopback IPv4 addresses, where mDNS is browsed by default."""
    return [ip for ip, _, kind in local_links() if kind != "loopback"] or ["127.0.0.1"]


class Membership:
    """Current worker addresses: the static ones, then discovered ones by worker id."""

    def __init__(self, opts: ClusterOptions):
        self.opts = opts
        self.browser = None
        if opts.discover:
            self.browser = Browser(list(opts.mdns_interfaces) or default_interfaces(), opts.cluster)

    def discovered(self) -> list[Advert]:
        return self.browser.workers() if self.browser else []

    def current(self) -> list[str]:
        seen, out = set(), []
        for a in [*self.opts.static, *(ad.address for ad in self.discovered())]:
            if a not in seen:
                seen.add(a)
                out.append(a)
        return out

    def label(self, address: str) -> str:
        """How to name a worker in the log: its mDNS advert and address, or the address given."""
        name = self.browser.name_of(address) if self.browser else None
        return f"worker {name} at {address}" if name else f"worker at {address}"

    def wait(self) -> list[str]:
        """Wait (up to the timeout) for the requested number of workers; refuse with who was found."""
        if self.browser and self.opts.workers == 0:  # "whoever is there": the first, then a short settle
            if self.browser.wait_for(1, self.opts.discover_timeout):
                time.sleep(self.opts.settle)
        elif self.browser:
            self.browser.wait_for(self.opts.workers - len(self.opts.static), self.opts.discover_timeout)
        got = self.current()
        if len(got) < max(self.opts.workers, 1):
            found = "; ".join(f"{a.worker_id} at {a.address} ({a.backend}, {a.usable_bytes / 2**30:.1f} GiB)"
                              for a in self.discovered()) or "none"
            ignored = "; ".join(self.browser.ignored.values()) if self.browser and self.browser.ignored else ""
            wanted = f"{len(got)} of {self.opts.workers} workers" if self.opts.workers else "no workers"
            raise MtpdistError(
                f"found {wanted} in cluster {self.opts.cluster!r} after "
                f"{self.opts.discover_timeout:.0f}s. Discovered: {found}." + (f" Ignored: {ignored}." if ignored else "")
                + " Check that `mtpdist worker` runs on each Mac, the cluster name, and --mdns-interface.")
        return got

    def where(self) -> str:
        """Where workers were looked for, for messages: the cluster name and interfaces."""
        ifaces = ", ".join(self.opts.mdns_interfaces or default_interfaces()) if self.opts.discover else "nowhere"
        return f"cluster {self.opts.cluster!r}, mDNS on {ifaces}"

    def close(self) -> None:
        if self.browser:
            self.browser.close()
