"""Which workers form the pipeline: static addresses plus those found on mDNS."""

from __future__ import annotations

import logging
import time
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from mtpdist.discovery import Advert, Browser, local_links
from mtpdist.errors import MtpdistError

from .vetting import Verdict, reason_kind

log = logging.getLogger("mtpdist.coordinator")
UNCHECKED = object()  # the "info" of an address taken without vetting
RETRY_REFUSED = 2.0  # s between tries of a refused peer while waiting (a stopped worker may resume)


@dataclass(frozen=True)
class ClusterOptions:
    """How the coordinator finds its workers (flags of generate/coordinator/status)."""
    workers: int = 0                       # wait for this many in all (static + discovered)
    static: tuple[str, ...] = ()           # --worker HOST:PORT, in pipeline order, first
    cluster: str = "default"
    mdns_interfaces: tuple[str, ...] = ()  # default: every non-loopback IPv4 address
    discover_timeout: float = 15.0

    settle: float = 2.0                    # with workers=0: wait until no new worker turned up for this long

    @property
    def discover(self) -> bool:
        return self.workers > len(self.static) or not self.static


def _in_background(fn, *args) -> Future:
    """Run fn(*args) on a daemon thread (a hung peer must not keep the process from exiting)."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
            fut.set_exception(e)
    threading.Thread(target=run, daemon=True, name="vet").start()
    return fut


def default_interfaces() -> list[str]:
    """This machine's non-loopback IPv4 addresses, where mDNS is browsed by default."""
    return [ip for ip, _, kind in local_links() if kind != "loopback"] or ["127.0.0.1"]


class Membership:
    """Current worker addresses: the static ones, then discovered ones by worker id."""

    def __init__(self, opts: ClusterOptions):
        self.opts = opts
        self.browser = None
        self.proven: dict = {}              # address -> WorkerInfo of peers that proved themselves
        self.refused: dict[str, str] = {}   # address -> why it does not count
        self.secret_refusals: set[str] = set()
        self.unanswered: set[str] = set()  # still being asked when the wait ended
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

    def wait(self, vet: Callable[[str], Verdict] | None = None) -> list[str]:
        """Wait (up to the timeout) until enough workers have proven themselves; refuse naming who was not.

        Every address (given or discovered) is vetted (`vet`: one Describe over mutual TLS); only
        proven ones count toward `--workers` and are returned. A refused peer (no secret, not
        TLS, no answer, closed port) is logged once and tried again every few seconds while we
        wait, so a rogue advert never takes a real worker's place nor ends the wait early.
        """
        vet = vet or (lambda a: Verdict(a, info=UNCHECKED))  # no check: every address counts
        want = max(self.opts.workers, 1)
        end = time.monotonic() + self.opts.discover_timeout
        pending: dict[str, Future] = {}
        tried: dict[str, float] = {}
        first = None  # when the first worker proved itself (for "whoever is there")
        known: set[str] = set()
        last_new = time.monotonic()  # when an address last turned up: discovery settles after a quiet spell
        try:
            while True:
                now = time.monotonic()
                if not known.issuperset(self.current()):
                    known.update(self.current())
                    last_new = now
                for a in self.current():
                    if a not in self.proven and a not in pending and now - tried.get(a, -1e9) >= RETRY_REFUSED:
                        pending[a] = _in_background(vet, a)
                for a, f in list(pending.items()):
                    if f.done():
                        del pending[a]
                        tried[a] = time.monotonic()
                        self._record(f.result())
                proven = self.proven_addresses()
                if proven and first is None:
                    first = now
                if not self.browser:  # addresses given: one round, no one else will turn up
                    done = not pending
                elif self.opts.workers == 0:  # "whoever is there": until no one new turned up for `settle` s
                    quiet = now - max(last_new, first or now)
                    busy = pending or self.browser.resolving   # still asking someone: not settled yet
                    done = first is not None and quiet >= self.opts.settle and (
                        not busy or quiet >= 3 * self.opts.settle)
                else:
                    done = len(proven) >= want
                if done or now >= end:
                    break
                if self.browser:
                    with self.browser.changed:
                        self.browser.changed.wait(0.05)
                else:
                    time.sleep(0.02)
        finally:  # a peer still being asked is not waited for (its daemon thread ends on its deadline)
            self.unanswered = set(pending)
        got = self.proven_addresses()
        if len(got) < want:
            raise MtpdistError(self._shortfall(got))
        return got

    def _record(self, v: Verdict) -> None:
        if v.proven:
            self.proven[v.address] = v.info
            self.refused.pop(v.address, None)
            return
        self.proven.pop(v.address, None)
        if reason_kind(self.refused.get(v.address, "")) != reason_kind(v.reason):
            log.warning("refusing %s: %s; it is sent nothing and does not count as a worker",
                        self.label(v.address), v.reason)
        self.refused[v.address] = v.reason
        self.secret_refusals.add(v.address) if v.secret else self.secret_refusals.discard(v.address)

    def proven_addresses(self) -> list[str]:
        """Addresses that answered as workers of this cluster, in membership order."""
        return [a for a in self.current() if a in self.proven]

    def _shortfall(self, got: list[str]) -> str:
        current = set(self.current())
        refused = "; ".join([f"{self.label(a)}: {r}" for a, r in self.refused.items() if a in current]
                            + [f"{self.label(a)}: no answer yet" for a in self.unanswered if a in current])
        if not self.browser:
            given = len(self.opts.static)
            msg = (f"none of the {given} worker(s) given answered as a member of this cluster" if not got else
                   f"{len(got)} of the {self.opts.workers} workers wanted answered as members of this cluster")
            msg += f". Refused: {refused}." if refused else "."
        else:
            ads = {a.address: a for a in self.discovered()}
            found = "; ".join(f"{ads[a].worker_id} at {a} ({ads[a].backend}, {ads[a].usable_bytes / 2**30:.1f} GiB)"
                              if a in ads else a for a in got) or "none"
            ignored = "; ".join(self.browser.ignored.values()) if self.browser.ignored else ""
            wanted = f"{len(got)} of {self.opts.workers} workers" if self.opts.workers else "no workers"
            msg = (f"found {wanted} in cluster {self.opts.cluster!r} after {self.opts.discover_timeout:.0f}s. "
                   f"Discovered: {found}." + (f" Refused (never counted): {refused}." if refused else "")
                   + (f" Ignored: {ignored}." if ignored else "")
                   + " Check that `mtpdist worker` runs on each Mac, the cluster name, and --mdns-interface.")
        if self.secret_refusals & current:
            msg += (" Check the cluster secret here (--token/--token-file/MTPDIST_TOKEN) and in the workers' logs "
                    "(their 'cluster CA' line).")
        return msg

    def where(self) -> str:
        """Where workers were looked for, for messages: the cluster name and interfaces."""
        ifaces = ", ".join(self.opts.mdns_interfaces or default_interfaces()) if self.opts.discover else "nowhere"
        return f"cluster {self.opts.cluster!r}, mDNS on {ifaces}"

    def close(self) -> None:
        if self.browser:
            self.browser.close()
