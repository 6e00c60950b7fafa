"""A coordinator session: head and MTP head here, layers on workers, re-planned on change."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Sequence

from tqdm import tqdm

from mtpdist.engine.generate import Generator
from mtpdist.engine.local import load_tokenizer_for
from mtpdist.engine.remote import PipelineTrunk
from mtpdist.engine.shards import ShardSource
from mtpdist.engine.transport import WorkerTransport
from mtpdist.errors import MtpdistError
from mtpdist.model.config import read_config
from mtpdist.model.hashing import model_hash
from mtpdist.model.loader import load_parts
from mtpdist.model.weights import Checkpoint, layer_of
from mtpdist.placement import Placement, PlacementError, plan_layers
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import PROTOCOL_VERSION, ShardSpec, WorkerInfo

log = logging.getLogger("mtpdist.coordinator")


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


class PipelineSession:
    """Generation through workers. `attach` (re)plans and loads shards for a worker list."""

    def __init__(self, model_dir: str | Path, workers: Sequence[str], mtp: bool = False, post_norm: bool = True,
                 prefill_step: int = 512, chain: bool = True, rewind: str = "carry", progress: bool = True,
                 channel: ChannelSettings = ChannelSettings(), headroom: float = 0.1,
                 candidates: Callable[[], list[str]] | None = None, balance_speed: bool = True):
        self.model_dir = Path(model_dir)
        self.chain, self.rewind, self.progress = chain, rewind, progress
        self.channel, self.headroom, self.balance_speed = channel, headroom, balance_speed
        self.config, self.raw_config = read_config(self.model_dir)
        self.layer_bytes = layer_bytes(self.model_dir, self.config.num_hidden_layers)
        self.model_hash = model_hash(self.model_dir, progress)
        self.parts = load_parts(self.model_dir, layers=(0, 0), head=True, mtp=mtp)
        self.generator = Generator(self.parts, load_tokenizer_for(self.model_dir), post_norm, prefill_step)
        self.clients: list[WorkerClient] = []
        self.infos: list[WorkerInfo] = []
        self.placement: Placement | None = None
        self._transport: WorkerTransport | None = None
        # Where workers may be found again after a failure (mDNS membership, or the list given).
        self.candidates = candidates or (lambda: list(workers))
        self.attach(workers)

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self.clients]

    def attach(self, workers: Sequence[str]) -> None:
        """Plan layers over `workers` (refusing before loading anything if they don't fit), load shards."""
        clients = [WorkerClient(a, self.channel) for a in workers]
        infos = [c.describe() for c in clients]
        for c, info in zip(clients, infos):
            if info.protocol_version != PROTOCOL_VERSION:
                raise MtpdistError(f"worker {c.address} speaks protocol {info.protocol_version}, "
                                   f"this coordinator {PROTOCOL_VERSION}; upgrade mtpdist on both")
        speed = _comparable_speeds([i.read_gbps for i in infos]) if self.balance_speed else None
        try:
            placement = plan_layers([i.usable_bytes for i in infos], self.layer_bytes, self.headroom, speed)
        except PlacementError as e:
            raise MtpdistError(f"the model does not fit: {e}") from e
        if speed:
            log.info("placing by stage time (read speeds %s GB/s): layers %s", [round(i.read_gbps, 1) for i in infos],
                     ", ".join(f"{s}-{e - 1}" for s, e in placement.ranges))
        for c, (start, end) in zip(clients, placement.ranges):
            self._load_shard(c, start, end)
        for old in self.clients:
            old.close()
        self.clients, self.placement = clients, placement
        self.infos = [c.describe() for c in clients]

    def _load_shard(self, client: WorkerClient, start: int, end: int) -> None:
        config_json = json.dumps(self.raw_config)
        spec = ShardSpec(self.model_hash, start, end, config_json)
        ok, _ = client.has_shard(spec)
        if ok:
            r = client.load_shard(spec)
        else:
            src = ShardSource(self.model_dir, start, end)
            spec = ShardSpec(self.model_hash, start, end, config_json, src.manifest())
            with tqdm(total=src.nbytes, unit="B", unit_scale=True, disable=not self.progress,
                      desc=f"layers {start}-{end - 1} -> {client.address}") as bar:
                r = client.load_shard(spec, src.chunks(bar.update))
        log.info("worker %s holds layers %d-%d (%s)", client.address, start, end - 1, r.source)

    def transport(self) -> WorkerTransport:
        """The scheduler's way through the current workers (made anew after each re-plan)."""
        if self._transport is None or self._transport.clients != self.clients:
            self._transport = WorkerTransport(self.clients)
        return self._transport

    def prepare(self) -> None:
        """The scheduler calls this between requests."""
        self.ensure_ready()

    def raw_trunk(self) -> PipelineTrunk:
        """A plain pipeline trunk for one sequence (no recovery)."""
        return PipelineTrunk(self.clients, chain=self.chain, rewind=self.rewind)

    def trunk(self):
        """A trunk for one sequence that recovers from losing workers."""
        from .resilience import ResilientTrunk
        return ResilientTrunk(self)

    def alive(self, addresses: Sequence[str], timeout: float = 2.0) -> dict[str, WorkerInfo]:
        """The workers among `addresses` that answer Describe within `timeout`, in order."""
        def probe(a):
            c = WorkerClient(a, replace(self.channel, timeout=timeout))
            try:
                return c.describe()
            except MtpdistError:
                return None
            finally:
                c.close()
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
            (i.model_hash, i.layer_start, i.layer_end) == (self.model_hash, *expected[a]) for a, i in infos.items())
        if not same:
            if not infos:
                raise MtpdistError("no worker answers")
            log.info("workers changed (%s -> %s); re-planning", self.addresses, list(infos))
            self.attach(list(infos))

    def close(self) -> None:
        for c in self.clients:
            c.close()
