"""The worker: one MLX thread computes; gRPC threads validate, queue, and pass results on."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from mtpdist import __version__
from mtpdist.errors import ModelLoadError, RequestError, WorkerCallError
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import (PROTOCOL_VERSION, ForwardCall, ForwardResult, LoadResult, ShardSpec,
                                WorkerInfo)

from .shard_store import ShardStore

log = logging.getLogger("mtpdist.worker")


def total_memory() -> int:
    """Physical memory in bytes (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class WorkerService:
    """Implements the wire's WorkerHandler."""

    def __init__(self, cache_root: Path, model_dir: Path | None = None, usable_bytes: int | None = None,
                 max_sequences: int = 64, worker_id: str | None = None,
                 channel: ChannelSettings = ChannelSettings()):
        self.store = ShardStore(cache_root)
        self.model_dir, self._model_dir_hash = model_dir, None
        self.memory = total_memory()
        self.usable = usable_bytes or int(self.memory * 0.75)
        self.max_sequences, self.channel = max_sequences, channel
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")  # the one MLX thread
        self.stage = None
        self.spec: ShardSpec | None = None
        self.weight_bytes = 0
        self._next: dict[str, WorkerClient] = {}
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------
    def _on_mlx(self, fn, *args):
        return self.mlx.submit(fn, *args).result()

    def _local_hash(self) -> str | None:
        if self.model_dir is not None and self._model_dir_hash is None:
            from mtpdist.model.hashing import model_hash
            self._model_dir_hash = model_hash(self.model_dir)
        return self._model_dir_hash

    def _client(self, address: str) -> WorkerClient:
        with self._lock:
            if address not in self._next:
                self._next[address] = WorkerClient(address, self.channel)
            return self._next[address]

    def _drop_client(self, address: str) -> None:
        with self._lock:
            client = self._next.pop(address, None)
        if client is not None:
            client.close()

    def _stage(self):
        if self.stage is None:
            raise RequestError("FAILED_PRECONDITION", "no shard loaded; the coordinator must call LoadShard first")
        return self.stage

    # -- WorkerHandler ---------------------------------------------------------------
    def describe(self) -> WorkerInfo:
        from mtpdist.engine.devices import backend_name, mlx_version
        stage = self.stage
        return WorkerInfo(
            worker_id=self.worker_id, version=__version__, protocol_version=PROTOCOL_VERSION,
            memory_bytes=self.memory, usable_bytes=self.usable, backend=backend_name(),
            chip=platform.processor() or platform.machine(),
            model_hash=self.spec.model_hash if self.spec else "",
            layer_start=self.spec.layer_start if self.spec else 0, layer_end=self.spec.layer_end if self.spec else 0,
            sequences=len(stage.seqs) if stage else 0, state_bytes=self._on_mlx(stage.state_bytes) if stage else 0,
            mlx_version=mlx_version(), weight_bytes=self.weight_bytes)

    def has_shard(self, spec: ShardSpec) -> tuple[bool, str]:
        if self.spec is not None and (spec.model_hash, spec.layer_start, spec.layer_end) == (
                self.spec.model_hash, self.spec.layer_start, self.spec.layer_end):
            return True, "loaded"
        if self._local_hash() == spec.model_hash:
            return True, "model-dir"
        if self.store.has(spec):
            return True, "cache"
        return False, ""

    def load_shard(self, spec: ShardSpec, chunks: Iterator[bytes]) -> LoadResult:
        if not 0 <= spec.layer_start < spec.layer_end:
            raise RequestError("INVALID_ARGUMENT", f"bad layer range [{spec.layer_start}, {spec.layer_end})")
        ok, source = self.has_shard(spec)
        received = 0
        if not ok:
            log.info("receiving layers %d-%d (%.1f MB)", spec.layer_start, spec.layer_end - 1,
                     sum(t.nbytes for t in spec.tensors) / 1e6)
            received = self.store.write(spec, chunks)
            source = "stream"
        if source != "loaded":
            path = self.model_dir if source == "model-dir" else self.store.path(spec)
            self._on_mlx(self._load, path, spec)
        log.info("holding layers %d-%d of model %s (from %s)", spec.layer_start, spec.layer_end - 1,
                 spec.model_hash[:12], source)
        return LoadResult(source, received, spec.layer_start, spec.layer_end)

    def _load(self, path: Path, spec: ShardSpec) -> None:
        from mtpdist.engine.stage import Stage
        from mtpdist.model.loader import load_parts
        self.stage, self.spec = None, None  # drop the old shard (and its sequences) first
        try:
            parts = load_parts(path, layers=(spec.layer_start, spec.layer_end), head=False)
        except ModelLoadError as e:
            raise RequestError("FAILED_PRECONDITION", f"cannot load shard: {e}") from e
        from mlx.utils import tree_flatten
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(parts.stack.parameters()))
        budget = max(self.usable - self.weight_bytes, 64 << 20)
        self.stage = Stage(parts.stack, parts.config.hidden_size, self.max_sequences, budget)
        self.spec = spec

    def forward(self, call: ForwardCall, deadline: float | None = None) -> ForwardResult:
        stage = self._stage()
        start = time.monotonic()
        out = self._on_mlx(stage.forward, call.sequence_id, call.position, call.hidden, call.rewind, call.keep)
        if not call.next:
            return ForwardResult(out.hidden, out.position, (out.compute_us,))
        # The next hop gets most of what is left of our caller's deadline, so that a hung
        # worker further down is reported by name before our caller gives up on us.
        left = None if deadline is None else max(0.2, (deadline - (time.monotonic() - start)) * 0.8)
        try:
            downstream = self._client(call.next[0]).forward(ForwardCall(
                call.sequence_id, call.position, out.hidden, call.rewind, call.keep, call.next[1:]), left)
        except WorkerCallError as e:
            if e.code == "UNAVAILABLE":  # a fresh channel next time: this one may sit in reconnect backoff
                self._drop_client(call.next[0])
            raise
        return ForwardResult(downstream.hidden, downstream.position, (out.compute_us, *downstream.compute_us))

    def rewind(self, sequence_id: str, n: int, position: int) -> int:
        return self._on_mlx(self._stage().rewind, sequence_id, n, position)

    def release(self, sequence_id: str) -> bool:
        return self._on_mlx(self._stage().release, sequence_id) if self.stage else False

    def expire_idle(self, ttl: float) -> list[str]:
        """Drop sequences idle for more than `ttl` seconds (on the MLX thread, between calls)."""
        stage = self.stage
        return self._on_mlx(stage.expire_idle, time.monotonic(), ttl) if stage else []

    def health(self) -> str:
        return "serving" if self.stage else "idle"
