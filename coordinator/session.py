"""A coordinator session over a fixed list of workers: plan, load shards, generate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mtpdist.engine.generate import Generator
from mtpdist.engine.local import load_tokenizer_for
from mtpdist.engine.remote import PipelineTrunk
from mtpdist.engine.shards import ShardSource
from mtpdist.errors import MtpdistError
from mtpdist.model.config import read_config
from mtpdist.model.hashing import model_hash
from mtpdist.model.loader import load_parts
from mtpdist.model.weights import Checkpoint, layer_of
from mtpdist.placement import PlacementError, plan_layers
from mtpdist.wire.client import WorkerClient
from mtpdist.wire.types import PROTOCOL_VERSION, ShardSpec

log = logging.getLogger("mtpdist.coordinator")


def layer_bytes(model_dir: Path, num_layers: int) -> list[int]:
    """Bytes of each backbone layer's weights (read from headers, nothing loaded)."""
    ckpt = Checkpoint(model_dir)
    sizes = [0] * num_layers
    for k, v in ckpt.tensors(lambda k: k.startswith("model.layers.")).items():
        sizes[layer_of(k)] += v.nbytes
    ckpt.close()
    return sizes


class PipelineSession:
    """Head and MTP head here; layers on workers, in the order given."""

    def __init__(self, model_dir: str | Path, workers: Sequence[str], mtp: bool = False, post_norm: bool = True,
                 prefill_step: int = 512, chain: bool = True, rewind: str = "carry", progress: bool = True,
                 rpc_timeout: float = 30.0):
        self.model_dir = Path(model_dir)
        self.chain, self.rewind = chain, rewind
        config, raw = read_config(self.model_dir)
        self.clients = [WorkerClient(a, timeout=rpc_timeout) for a in workers]
        infos = [c.describe() for c in self.clients]
        for c, info in zip(self.clients, infos):
            if info.protocol_version != PROTOCOL_VERSION:
                raise MtpdistError(f"worker {c.address} speaks protocol {info.protocol_version}, "
                                   f"this coordinator {PROTOCOL_VERSION}; upgrade mtpdist on both")
        try:
            self.placement = plan_layers([i.usable_bytes for i in infos],
                                         layer_bytes(self.model_dir, config.num_hidden_layers))
        except PlacementError as e:
            raise MtpdistError(str(e)) from e
        self.model_hash = model_hash(self.model_dir, progress)
        for c, (start, end) in zip(self.clients, self.placement.ranges):
            self._load_shard(c, start, end, json.dumps(raw), progress)
        self.parts = load_parts(self.model_dir, layers=(0, 0), head=True, mtp=mtp)
        self.generator = Generator(self.parts, load_tokenizer_for(self.model_dir), post_norm, prefill_step)

    def _load_shard(self, client: WorkerClient, start: int, end: int, config_json: str, progress: bool) -> None:
        spec = ShardSpec(self.model_hash, start, end, config_json)
        ok, source = client.has_shard(spec)
        if ok:
            r = client.load_shard(spec)
        else:
            src = ShardSource(self.model_dir, start, end)
            spec = ShardSpec(self.model_hash, start, end, config_json, src.manifest())
            with tqdm(total=src.nbytes, unit="B", unit_scale=True, disable=not progress,
                      desc=f"layers {start}-{end - 1} -> {client.address}") as bar:
                r = client.load_shard(spec, src.chunks(bar.update))
        log.info("worker %s holds layers %d-%d (%s)", client.address, start, end - 1, r.source)

    def trunk(self) -> PipelineTrunk:
        return PipelineTrunk(self.clients, chain=self.chain, rewind=self.rewind)

    def close(self) -> None:
        for c in self.clients:
            c.close()
