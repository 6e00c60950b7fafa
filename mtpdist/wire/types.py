"""Plain frozen dataclasses that cross the wire boundary (no protobuf here)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

PROTOCOL_VERSION = 4
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Activation:
    """Hidden states as raw little-endian bytes."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard manifest."""
    name: str
    dtype: str      # safetensors code (F32, BF16, U32, ...)
    shape: tuple[int, ...]
    nbytes: int
    sha256: bytes = b""   # of the bytes as streamed


@dataclass(frozen=True)
class ShardSpec:
    """A contiguous layer range of one model (by content hash), and the stage's route in the plan."""
    model_hash: str
    layer_start: int
    layer_end: int
    config_json: str
    tensors: tuple[TensorInfo, ...] = ()
    downstream: tuple[str, ...] = ()   # the planned workers after this stage: the only allowed `next` hops
    max_forward_tokens: int = 0        # 0: the worker's default
    budget_bytes: int = 0              # this stage's share of its host's memory in the plan; 0: its own offer
    upstream: str = ""                 # the planned worker before this stage ("": the coordinator)
    route: str = ""                    # the plan's ring id: a link naming another route is refused

    def digest(self) -> str:
        """What the shard is: model, layer range, config and every tensor's name, layout and content hash."""
        h = hashlib.sha256(f"{self.model_hash}:{self.layer_start}:{self.layer_end}\n".encode())
        h.update(hashlib.sha256(self.config_json.encode()).digest())
        for t in self.tensors:
            h.update(f"{t.name}:{t.dtype}:{list(t.shape)}:{t.nbytes}:".encode() + t.sha256)
        return h.hexdigest()[:32]


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports about itself."""
    worker_id: str
    version: str
    protocol_version: int
    memory_bytes: int
    usable_bytes: int
    backend: str
    chip: str
    model_hash: str = ""
    layer_start: int = 0
    layer_end: int = 0
    sequences: int = 0
    state_bytes: int = 0
    mlx_version: str = ""
    weight_bytes: int = 0
    read_gbps: float = 0.0
    prefixes: int = 0
    shard_digest: str = ""
    host_id: str = ""      # equal for workers on one machine: they share its memory_bytes
    link_port: int = 0     # the ring's socket links on the worker's host; 0: gRPC stream links


@dataclass(frozen=True)
class SequenceRows:
    """One sequence's rows in a Forward, and where its cache must stand first."""
    sequence_id: str
    position: int
    tokens: int
    epoch: int = 0                   # newer than the worker's: go back to `position` first; older: stale
    snapshots: tuple[int, ...] = ()  # row counts after which recurrent state is snapshotted
    keep_as: str = ""                # after these rows, also keep a copy of the state under this name
    floor: int = 0                   # no later rows go back before this position (0: `position`)


@dataclass(frozen=True)
class ForwardCall:
    """One forward of several sequences' rows (`hidden` holds them back to back)."""
    sequences: tuple[SequenceRows, ...]
    hidden: Activation
    next: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return sum(s.tokens for s in self.sequences)

    @classmethod
    def single(cls, sequence_id: str, position: int, hidden: Activation, epoch: int = 0,
               snapshots: tuple[int, ...] = (), next: tuple[str, ...] = ()) -> "ForwardCall":
        """A Forward of one sequence's rows (all of `hidden`)."""
        rows = max(hidden.shape[0], 0) if hidden.shape else 0
        return cls((SequenceRows(sequence_id, position, rows, epoch, tuple(snapshots)),), hidden, tuple(next))


@dataclass(frozen=True)
class ForwardResult:
    """The last stage's hidden states and each sequence's cache position after."""
    hidden: Activation
    positions: tuple[int, ...]
    compute_us: tuple[int, ...] = field(default_factory=tuple)
    batch_rows: tuple[int, ...] = field(default_factory=tuple)

    @property
    def position(self) -> int:
        """The first (or only) sequence's position."""
        return self.positions[0]


@dataclass(frozen=True)
class LoadResult:
    """How a shard was loaded."""
    source: str
    bytes_received: int
    layer_start: int
    layer_end: int
    shard_digest: str = ""
