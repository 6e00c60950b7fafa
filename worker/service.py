"""The worker: one MLX thread computes; gRPC threads validate, queue, and pass results on."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from mtpdist import __version__
from mtpdist.errors import ModelLoadError, RequestError, WorkerCallError
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import (PROTOCOL_VERSION, ForwardCall, ForwardResult, LoadResult, ShardSpec,
                                WorkerInfo)

from .compute import ComputeLoop, StageEmulation
from .ring import RingStage
from .warm import compiles_kernels, warm
from .shard_store import ShardStore, check_manifest

log = logging.getLogger("mtpdist.worker")
# Tokens one Forward may carry when the coordinator set no limit: a large prefill chunk with
# the coordinator's margin. A bigger request would hold the one compute thread (and memory) far longer.
DEFAULT_MAX_FORWARD_TOKENS = 2048 + 640


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
                 channel: ChannelSettings = ChannelSettings(), cache_max_bytes: int | None = None,
                 emulate: StageEmulation | None = None, read_gbps: float | None = None):
        self.model_dir, self._model_dir_hash = model_dir, None
        self.memory = total_memory()
        self.usable = usable_bytes or int(self.memory * 0.75)
        # Room for the shard held and one more (a re-plan) unless told otherwise.
        self.store = ShardStore(cache_root, cache_max_bytes if cache_max_bytes is not None else 2 * self.usable)
        self.max_sequences, self.channel = max_sequences, channel
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.host_id = ""  # set by `mtpdist worker`: workers of one machine share its memory in placement
        self.compute = ComputeLoop(emulate=emulate)  # the one MLX thread
        self.read_gbps = read_gbps
        self.stage = None
        self.spec: ShardSpec | None = None
        self.weight_bytes = 0
        self._next: dict[str, WorkerClient] = {}
        self._lock = threading.Lock()
        # Set by every LoadShard from the coordinator's plan: where Forward may pass output on.
        self.downstream: frozenset[str] = frozenset()
        self.max_forward_tokens = DEFAULT_MAX_FORWARD_TOKENS
        self.ring = RingStage(self)   # the plan's links: units arrive and leave here
        self.link_port = 0            # set by `mtpdist worker` when it listens for socket links

    # -- helpers ---------------------------------------------------------------------
    def _on_mlx(self, fn, *args):
        return self.compute.call(fn, *args)

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

    def _check_route(self, hops) -> None:
        """Refuse a Forward whose `next` hops are not the planned workers after this stage."""
        bad = [h for h in hops if h not in self.downstream]
        if bad:
            log.warning("refused a Forward to %s: not a planned worker after this stage", bad[0])
            raise RequestError("denied", f"next hop {bad[0]} is not a planned worker after this stage")

    def _check_tokens(self, tokens: int) -> None:
        """Refuse a Forward larger than the coordinator's prefill chunk (with a margin), before any compute."""
        if tokens > self.max_forward_tokens:
            raise RequestError("invalid", f"a Forward carries at most {self.max_forward_tokens} tokens "
                                                   f"on this worker, got {tokens}")

    def _stage(self):
        if self.stage is None:
            raise RequestError("state_lost", "no shard loaded; the coordinator must call LoadShard first")
        return self.stage

    # -- WorkerHandler ---------------------------------------------------------------
    def describe(self) -> WorkerInfo:
        from mtpdist.model.backend import backend_name, mlx_version
        stage = self.stage
        return WorkerInfo(
            worker_id=self.worker_id, version=__version__, protocol_version=PROTOCOL_VERSION,
            memory_bytes=self.memory, usable_bytes=self.usable, backend=backend_name(),
            chip=platform.processor() or platform.machine(),
            model_hash=self.spec.model_hash if self.spec else "",
            layer_start=self.spec.layer_start if self.spec else 0, layer_end=self.spec.layer_end if self.spec else 0,
            sequences=len(stage.seqs) if stage else 0, prefixes=len(stage.prefixes) if stage else 0,
            state_bytes=self._on_mlx(stage.state_bytes) if stage else 0,
            mlx_version=mlx_version(), weight_bytes=self.weight_bytes, read_gbps=self._read_speed(),
            shard_digest=self.spec.digest() if self.spec else "", host_id=self.host_id,
            link_port=self.link_port)

    def measure_read_speed(self) -> None:
        """Measure the read speed once, in the background: a Describe never waits for it (a busy
        or slow machine must still answer at once); until then the worker reports 0 (unknown)."""
        if self.read_gbps is not None:
            return
        from .devices import measure_read_gbps

        def run():
            self.read_gbps = self._on_mlx(measure_read_gbps)
        threading.Thread(target=run, name="read-speed", daemon=True).start()

    def _read_speed(self) -> float:
        return self.read_gbps or 0.0

    def has_shard(self, spec: ShardSpec) -> tuple[bool, str]:
        if self.spec is not None and spec.digest() == self.spec.digest():
            return True, "loaded"
        if self._local_hash() == spec.model_hash:
            return True, "model-dir"
        if self.store.has(spec):
            return True, "cache"
        return False, ""

    def load_shard(self, spec: ShardSpec, chunks: Iterator[bytes]) -> LoadResult:
        """Hold `spec`'s layers (already held, own copy, verified cache, or the stream); a failure keeps the old shard."""
        if not 0 <= spec.layer_start < spec.layer_end:
            raise RequestError("invalid", f"bad layer range [{spec.layer_start}, {spec.layer_end})")
        _check_config(spec)
        check_manifest(spec)
        ok, source = self.has_shard(spec)
        received = 0
        if source == "cache":
            self.store.verify(spec)  # DATA_LOSS (and the copy deleted) if it was changed on disk
        if not ok:
            log.info("receiving layers %d-%d (%.1f MB)", spec.layer_start, spec.layer_end - 1,
                     sum(t.nbytes for t in spec.tensors) / 1e6)
            received = self.store.write(spec, chunks)
            source = "stream"
        if source != "loaded":
            path = self.model_dir if source == "model-dir" else self.store.path(spec)
            try:
                self._on_mlx(self._load, path, spec)
            except RequestError:
                if source in ("cache", "stream"):
                    self.store.remove(spec)  # never leave a shard that cannot load marked complete
                raise
            if source in ("cache", "stream"):
                self.store.touch(spec)
        elif self.stage is not None:  # the same shard under a new plan: its share of the host may differ
            self.stage.state_budget = self._state_budget(spec, self.weight_bytes)
            self.spec = spec              # and its route (the ring's links check it)
        self.downstream = frozenset(spec.downstream)
        self.max_forward_tokens = spec.max_forward_tokens or DEFAULT_MAX_FORWARD_TOKENS
        self.ring.planned(spec)
        log.info("holding layers %d-%d of model %s (from %s)", spec.layer_start, spec.layer_end - 1,
                 spec.model_hash[:12], source)
        return LoadResult(source, received, spec.layer_start, spec.layer_end, spec.digest())

    def _load(self, path: Path, spec: ShardSpec) -> None:
        from mlx.utils import tree_flatten

        from .sequences import SequenceStore
        from mtpdist.model.loader import load_parts
        incoming = sum(t.nbytes for t in spec.tensors)
        if self.stage is not None and self.weight_bytes + incoming > self.usable:
            # Both shards do not fit: drop the old one first (the new one's config and bytes are already checked).
            log.info("dropping layers %d-%d before loading: both shards do not fit in memory",
                     self.spec.layer_start, self.spec.layer_end - 1)
            self.stage, self.spec, self.weight_bytes = None, None, 0
        try:
            parts = load_parts(path, layers=(spec.layer_start, spec.layer_end), head=False)
        except (ModelLoadError, ValueError, KeyError, TypeError) as e:
            raise RequestError("invalid", f"cannot load shard: {e}") from e
        weight_bytes = sum(v.nbytes for _, v in tree_flatten(parts.stack.parameters()))
        budget = self._state_budget(spec, weight_bytes)
        store = SequenceStore(parts.stack, parts.config.hidden_size, self.max_sequences, budget)
        if compiles_kernels():   # the first real unit must not compile kernels (LoadShard answers once warm)
            warm(store)
        # Swap only now: until the new shard is built, the old one (and its sequences) stays.
        self.stage = store
        self.spec, self.weight_bytes = spec, weight_bytes

    def _state_budget(self, spec: ShardSpec, weight_bytes: int) -> int:
        """Bytes for sequence state: the plan's share of this machine (several workers on one
        host share it), or our own offer, less the weights."""
        usable = min(self.usable, spec.budget_bytes) if spec.budget_bytes else self.usable
        return max(usable - weight_bytes, 64 << 20)

    def forward(self, call: ForwardCall, deadline: float | None = None,
                active: Callable[[], bool] | None = None) -> ForwardResult:
        """Run our layers, then pass the rows on to the next hop and wait for its answer (while
        our caller still waits: `active()` turns False when it gives up)."""
        self._check_route(call.next)
        self._check_tokens(call.hidden.shape[0] if call.hidden.shape else 0)
        stage = self._stage()
        start = time.monotonic()
        # Chunks of one sequence may overtake each other between stages; the wait covers that race.
        out = self.compute.forward_in_order(stage, call, 0.5 if deadline is None else min(0.5, deadline * 0.5))
        if not call.next:
            return ForwardResult(out.hidden, out.positions, (out.compute_us,), (out.batch_rows,))
        # The next hop gets most of what is left of our caller's deadline, so that a hung
        # worker further down is reported by name before our caller gives up on us.
        left = None if deadline is None else max(0.2, (deadline - (time.monotonic() - start)) * 0.8)
        try:
            downstream = self._pass_on(call.next[0], ForwardCall(call.sequences, out.hidden, call.next[1:]), left, active)
        except WorkerCallError as e:
            if e.code == "UNAVAILABLE":  # a fresh channel next time: this one may sit in reconnect backoff
                self._drop_client(call.next[0])
            raise
        return ForwardResult(downstream.hidden, downstream.positions, (out.compute_us, *downstream.compute_us),
                             (out.batch_rows, *downstream.batch_rows))

    def forward_async(self, call: ForwardCall, done: Callable) -> None:
        """A ring frame's rows: checked here, then queued on the MLX thread, which calls
        `done(StageRun | None, error)` when they have run (see worker/ring.py)."""
        self._check_tokens(call.hidden.shape[0] if call.hidden.shape else 0)
        self.compute.forward_then(self._stage(), call, done)

    def open_link(self, hello):
        """A link of the plan's ring (mtpdist/wire/links.py), checked against the plan."""
        return self.ring.open_link(hello)

    def _pass_on(self, address: str, call: ForwardCall, timeout: float | None, active) -> ForwardResult:
        """Forward to the next hop; give up as soon as our own caller has (it may have declared the
        next hop lost), so that no thread here waits on a stopped worker for a whole deadline."""
        done = threading.Event()
        box: list = []
        fut = self._client(address).forward_async(call, lambda r: (box.append(r), done.set()), timeout)
        while not done.wait(0.25):
            if active is not None and not active():
                fut.cancel()
                raise RequestError("internal", "the caller gave up on this Forward")
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def release(self, sequence_id: str) -> bool:
        return self._on_mlx(self._stage().release, sequence_id) if self.stage else False

    def keep(self, sequence_id: str, length: int, name: str) -> int:
        return self._on_mlx(self._stage().keep, sequence_id, length, name)

    def fork(self, prefix: str, sequence_id: str) -> int:
        return self._on_mlx(self._stage().fork, prefix, sequence_id)

    def expire_idle(self, ttl: float) -> list[str]:
        """Drop sequences idle for more than `ttl` seconds (on the MLX thread, between calls)."""
        stage = self.stage
        return self._on_mlx(stage.expire_idle, time.monotonic(), ttl) if stage else []

    def expire_prefixes(self, ttl: float) -> list[str]:
        """Drop kept prefixes unused for more than `ttl` seconds (on the MLX thread, between calls)."""
        stage = self.stage
        return self._on_mlx(stage.expire_prefixes, time.monotonic(), ttl) if stage else []

    def health(self) -> str:
        return "serving" if self.stage else "idle"


def _check_config(spec: ShardSpec) -> None:
    """A shard's config must parse as a model config that has its layers, before anything is written or dropped."""
    import json

    from mtpdist.model.config import ModelConfig
    try:
        config = ModelConfig.from_dict(json.loads(spec.config_json))
    except (ModelLoadError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RequestError("invalid", f"the shard's config_json is not a model config: {e}") from None
    if spec.layer_end > config.num_hidden_layers:
        raise RequestError("invalid", f"layers [{spec.layer_start}, {spec.layer_end}) are beyond the "
                                               f"model's {config.num_hidden_layers}")
