"""A coordinator session: head and MTP head here, layers on workers, re-planned on change."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Sequence

from tqdm import tqdm

from mtpdist.engine.generate import Generator
from .local_session import load_tokenizer_for
from .shards import ShardSource
from mtpdist.engine.ring import RingTransport
from mtpdist.errors import MtpdistError, WorkerCallError
from mtpdist.model.config import read_config
from mtpdist.model.hashing import model_hash
from mtpdist.model.loader import load_parts
from mtpdist.model.weights import Checkpoint, layer_of
from mtpdist.placement import Placement, PlacementError, keep_held, plan_layers, share_host_budgets
from mtpdist.wire.auth import is_handshake_failure
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import PROTOCOL_VERSION, ShardSpec, WorkerInfo

from .vetting import reason_kind, refusal_reason

log = logging.getLogger("mtpdist.coordinator")
# Tokens a worker accepts per Forward beyond the prefill chunk: decode/verify rows that may
# ride along (64 sequences x (1 + up to 8 drafts)) plus slack; never the tens of thousands an
# abusive caller could send (8,192 held a worker's compute thread for 51 s).
FORWARD_TOKEN_MARGIN = 64 * 9 + 64
# A peer refused (no secret, no answer) is probed again at most this often, not before every request.
REFUSED_RECHECK = 10.0


def layer_bytes(model_dir: Path, num_layers: int) -> list[int]:
    """Bytes of each backbone layer's weights (read from headers, nothing loaded)."""
    ckpt = Checkpoint(model_dir)
    sizes = [0] * num_layers
    for k, v in ckpt.tensors(lambda k: k.startswith("model.layers.")).items():
        sizes[layer_of(k)] += v.nbytes
    ckpt.close()
    return sizes


def _comparable_speeds(gbps: list[float]) -> list[float] | None:
    """Speeds rounded to 10% of the fastest, so that measurement noise between like Macs does
    not skew the plan; None unless every worker reported one."""
    if not gbps or min(gbps) <= 0:
        return None
    top = max(gbps)
    return [max(1, round(10 * g / top)) / 10 for g in gbps]


def _host_shares(infos: list[WorkerInfo]) -> list[int]:
    """Each worker's usable bytes, workers of one machine sharing its budget (logged when it binds)."""
    usable = [i.usable_bytes for i in infos]
    shared = share_host_budgets(usable, [i.host_id for i in infos], [i.memory_bytes for i in infos])
    if shared != usable:
        log.info("workers on one machine share its memory: usable %s GiB -> %s GiB",
                 [round(u / 2**30, 1) for u in usable], [round(u / 2**30, 1) for u in shared])
    return shared


class PipelineSession:
    """Generation through workers. `attach` (re)plans and loads shards for a worker list."""

    def __init__(self, model_dir: str | Path, workers: Sequence[str], mtp: bool = False, post_norm: bool = True,
                 prefill_step: int = 512, progress: bool = True,
                 channel: ChannelSettings = ChannelSettings(), headroom: float = 0.1,
                 candidates: Callable[[], list[str]] | None = None, label: Callable[[str], str] | None = None,
                 balance_speed: bool = True, refused: dict[str, str] | None = None):
        self.model_dir = Path(model_dir)
        self.prefill_step = prefill_step
        self.label = label or (lambda address: f"worker at {address}")  # e.g. the mDNS advert's name
        # address -> (when, why) it was refused; seeded with what discovery already refused (logged there)
        self.refused: dict[str, tuple[float, str]] = {a: (time.monotonic(), r) for a, r in (refused or {}).items()}
        self.digests: dict[tuple[int, int], str] = {}   # planned shard digest by layer range
        self.progress = progress
        self.channel, self.headroom, self.balance_speed = channel, headroom, balance_speed
        self.config, self.raw_config = read_config(self.model_dir)
        self.layer_bytes = layer_bytes(self.model_dir, self.config.num_hidden_layers)
        self.model_hash = model_hash(self.model_dir, progress)
        self.parts = load_parts(self.model_dir, layers=(0, 0), head=True, mtp=mtp)
        self.generator = Generator(self.parts, load_tokenizer_for(self.model_dir), post_norm, prefill_step)
        self.clients: list[WorkerClient] = []
        self.infos: list[WorkerInfo] = []
        self.placement: Placement | None = None
        self._transport: RingTransport | None = None
        self.route = ""   # the current plan's ring id (a fresh one per attach)
        # Where workers may be found again after a failure (mDNS membership, or the list given).
        self.candidates = candidates or (lambda: list(workers))
        self.attach(workers)

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self.clients]

    def attach(self, workers: Sequence[str]) -> None:
        """Plan layers over `workers` (refusing before loading anything if they don't fit), load shards.

        A worker that cannot prove it holds the cluster secret is dropped here, before it is
        sent anything: it is logged by name and address and the others are used.
        """
        clients, infos = [], []
        for a in workers:
            c = WorkerClient(a, self.channel)
            info = self._describe_member(c)
            if info is None:
                c.close()
                continue
            clients.append(c)
            infos.append(info)
        if not clients:
            ca = self.channel.identity.fingerprint if self.channel.identity else "none"
            raise MtpdistError(
                f"none of {len(workers)} worker(s) proved it holds this cluster's secret ({', '.join(workers)}); "
                f"check the secret here (--token/--token-file/MTPDIST_TOKEN; cluster CA {ca}) and in the workers' "
                "logs (their 'cluster CA' line)" if workers else "no workers")
        for c, info in zip(clients, infos):
            if info.protocol_version != PROTOCOL_VERSION:
                raise MtpdistError(f"worker {c.address} speaks protocol {info.protocol_version}, "
                                   f"this coordinator {PROTOCOL_VERSION}; upgrade mtpdist on both")
        speed = _comparable_speeds([i.read_gbps for i in infos]) if self.balance_speed else None
        usable = _host_shares(infos)
        try:
            placement = plan_layers(usable, self.layer_bytes, self.headroom, speed)
        except PlacementError as e:
            raise MtpdistError(f"the model does not fit: {e}") from e
        held = [(i.layer_start, i.layer_end) if i.model_hash == self.model_hash else (0, 0) for i in infos]
        kept = keep_held(placement, held, usable, self.layer_bytes, self.headroom, speed)
        if kept is not placement and kept.ranges != placement.ranges:
            log.info("keeping the layers the workers hold (%s): within %d%% of the best plan's slowest stage",
                     ", ".join(f"{s}-{e - 1}" for s, e in kept.ranges), 15)
        placement = kept
        if speed:
            log.info("placing by stage time (read speeds %s GB/s): layers %s", [round(i.read_gbps, 1) for i in infos],
                     ", ".join(f"{s}-{e - 1}" for s, e in placement.ranges))
        addresses = [c.address for c in clients]
        route = uuid.uuid4().hex     # links of an earlier plan are refused from now on
        for i, (c, (start, end)) in enumerate(zip(clients, placement.ranges)):
            self._load_shard(c, start, end, tuple(addresses[i + 1:]), budget=usable[i],
                             upstream=addresses[i - 1] if i else "", route=route)
        for old in self.clients:
            old.close()
        self.clients, self.placement, self.route = clients, placement, route
        self.infos = [c.describe() for c in clients]
        for c, info, (start, end) in zip(clients, self.infos, placement.ranges):
            self._check_holds(c.address, info, start, end)

    def _describe_member(self, client: WorkerClient) -> WorkerInfo | None:
        """Describe over mutual TLS; None (logged once, by name, saying what happened) for a peer
        whose handshake failed: one without the cluster secret, or one that never answered it."""
        t0 = time.monotonic()
        try:
            info = client.describe()
            self.refused.pop(client.address, None)  # log again if it is refused again later
            return info
        except WorkerCallError as e:
            if self.channel.identity is None and "socket closed" in e.details.lower():
                raise WorkerCallError(client.address, e.kind, e.code, e.details + " (a worker that closes a plaintext "
                                      "connection most likely requires mutual TLS: use the cluster secret, not "
                                      "--insecure)") from None
            if not is_handshake_failure(e.code, e.details):
                raise
            reason, _ = refusal_reason(e.code, e.details, time.monotonic() - t0, self.channel.identity is not None)
            self._refuse(client.address, reason)
            return None

    def _refuse(self, address: str, reason: str) -> None:
        if reason_kind(self.refused.get(address, (0, ""))[1]) != reason_kind(reason):
            log.warning("refusing %s: %s; it is sent nothing", self.label(address), reason)
        self.refused[address] = (time.monotonic(), reason)

    def _recently_refused(self, address: str) -> bool:
        """Refused less than REFUSED_RECHECK s ago: not probed again before every request."""
        return time.monotonic() - self.refused.get(address, (-1e9, ""))[0] < REFUSED_RECHECK

    def _spec(self, start: int, end: int, downstream: tuple[str, ...], budget: int = 0, upstream: str = "",
              route: str = "") -> ShardSpec:
        src = ShardSource(self.model_dir, start, end)
        try:
            manifest = src.manifest(self.model_hash)
        finally:
            src.ckpt.close()
        spec = ShardSpec(self.model_hash, start, end, json.dumps(self.raw_config), manifest,
                         downstream=downstream, max_forward_tokens=self.forward_token_limit(), budget_bytes=budget,
                         upstream=upstream, route=route)
        self.digests[(start, end)] = spec.digest()
        return spec

    def forward_token_limit(self) -> int:
        """The most rows one Forward may carry, told to every worker with its shard."""
        return self.prefill_step + FORWARD_TOKEN_MARGIN

    def _load_shard(self, client: WorkerClient, start: int, end: int, downstream: tuple[str, ...] = (),
                    budget: int = 0, upstream: str = "", route: str = "") -> None:
        spec = self._spec(start, end, downstream, budget, upstream, route)
        for attempt in range(2):
            ok, _ = client.has_shard(spec)
            try:
                if ok:
                    r = client.load_shard(spec)
                else:
                    src = ShardSource(self.model_dir, start, end)
                    with tqdm(total=src.nbytes, unit="B", unit_scale=True, disable=not self.progress,
                              desc=f"layers {start}-{end - 1} -> {client.address}") as bar:
                        r = client.load_shard(spec, src.chunks(bar.update))
            except WorkerCallError as e:
                if e.code != "DATA_LOSS" or attempt:
                    raise
                log.warning("worker %s refused layers %d-%d: %s; sending them again", client.address, start, end - 1,
                            e.details)
                continue
            if r.shard_digest != spec.digest():
                raise MtpdistError(f"worker {client.address} reports shard {r.shard_digest or 'none'} after loading "
                                   f"layers {start}-{end - 1}, planned {spec.digest()}")
            log.info("worker %s holds layers %d-%d (%s)", client.address, start, end - 1, r.source)
            return

    def _check_holds(self, address: str, info: WorkerInfo, start: int, end: int) -> None:
        """The worker must hold exactly the planned shard: model, layer range and manifest digest."""
        want = self.digests[(start, end)]
        got = (info.model_hash, info.layer_start, info.layer_end, info.shard_digest)
        if got != (self.model_hash, start, end, want):
            raise MtpdistError(f"worker {address} holds {got[0][:12] or 'nothing'} layers {got[1]}-{got[2] - 1} "
                               f"(shard {got[3] or 'none'}), planned {self.model_hash[:12]} layers {start}-{end - 1} "
                               f"(shard {want})")

    def transport(self) -> RingTransport:
        """The scheduler's way through the current workers: the plan's ring (made anew after each re-plan)."""
        if self._transport is None or self._transport.clients != self.clients:
            if self._transport is not None:
                self._transport.close()
            self._transport = RingTransport(self.clients, self.channel.step_timeout, route=self.route,
                                            link_ports=tuple(i.link_port for i in self.infos))
        return self._transport

    def prepare(self) -> None:
        """The scheduler calls this between requests."""
        self.ensure_ready()

    def alive(self, addresses: Sequence[str], timeout: float = 2.0) -> dict[str, WorkerInfo]:
        """The workers among `addresses` that answer Describe within `timeout`, in order."""
        def probe(a):
            c = WorkerClient(a, replace(self.channel, timeout=timeout))
            try:
                return self._describe_member(c)
            except MtpdistError:
                return None
            finally:
                c.close()
        addresses = [a for a in addresses if not self._recently_refused(a)]
        with ThreadPoolExecutor(max(1, len(addresses))) as pool:
            infos = list(pool.map(probe, addresses))
        return {a: i for a, i in zip(addresses, infos) if i is not None}

    def recover(self) -> None:
        """After a failure: re-plan over the workers that still answer."""
        alive = list(self.alive(self.candidates()))
        if not alive:
            raise MtpdistError("no worker answers; cannot continue")
        log.warning("re-planning over %d worker(s): %s", len(alive), ", ".join(alive))
        self.attach(alive)

    def ensure_ready(self) -> None:
        """Before a request: pick up workers that joined, left or restarted (and lost their shard)."""
        infos = self.alive(self.candidates())
        expected = {c.address: r for c, r in zip(self.clients, self.placement.ranges)}
        same = list(infos) == self.addresses and all(
            (i.model_hash, i.layer_start, i.layer_end, i.shard_digest)
            == (self.model_hash, *expected[a], self.digests.get(expected[a])) for a, i in infos.items())
        if not same:
            if not infos:
                raise MtpdistError("no worker answers")
            log.info("workers changed (%s -> %s); re-planning", self.addresses, list(infos))
            self.attach(list(infos))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for c in self.clients:
            c.close()
