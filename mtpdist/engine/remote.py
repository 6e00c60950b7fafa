"""A Trunk whose layers run on workers, for one sequence.

Hidden states go down the chain worker to worker (`chain=True`) or hop through the
coordinator (`chain=False`, the star). A rejected draft is either carried on the next
forward (`rewind="carry"`: no extra message) or broadcast at once (`rewind="broadcast"`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx

from ..wire.client import WorkerClient
from ..wire.types import ForwardCall, SequenceRows
from .activations import from_activation, to_activation


@dataclass
class TrunkTimings:
    """Wall time, worker compute and bytes of one sequence on the pipeline."""
    forwards: int = 0
    wall_us: int = 0
    compute_us: int = 0
    bytes_sent: int = 0
    rewinds: int = 0
    per_stage_us: list[int] = field(default_factory=list)


class PipelineTrunk:
    """The Trunk protocol over workers, for one sequence."""
    def __init__(self, clients: Sequence[WorkerClient], chain: bool = True, rewind: str = "carry",
                 sequence_id: str | None = None):
        if rewind not in ("carry", "broadcast"):
            raise ValueError("rewind must be 'carry' or 'broadcast'")
        self.clients, self.chain, self.rewind_mode = list(clients), chain, rewind
        self.sequence_id = sequence_id or uuid.uuid4().hex
        self.position = 0
        self.pending_rewind = 0
        self.inflight: list = []
        self.timings = TrunkTimings()

    @property
    def offset(self) -> int:
        return self.position

    def forward(self, hidden: mx.array, keep: Sequence[int] = ()) -> mx.array:
        self._settle_rewinds()
        act = to_activation(hidden[0])
        t0 = time.perf_counter()
        rows = (SequenceRows(self.sequence_id, self.position, hidden.shape[1], self.pending_rewind, tuple(keep)),)
        if self.chain:
            rest = tuple(c.address for c in self.clients[1:])
            r = self.clients[0].forward(ForwardCall(rows, act, rest))
            stages = r.compute_us
        else:
            stages = []
            for c in self.clients:
                r = c.forward(ForwardCall(rows, act))
                act = r.hidden
                stages.extend(r.compute_us)
        t = self.timings
        t.forwards += 1
        t.wall_us += int((time.perf_counter() - t0) * 1e6)
        t.compute_us += sum(stages)
        t.bytes_sent += 2 * len(self.clients) * len(act.data)  # each stage: request in, reply out
        self.pending_rewind = 0
        self.position = r.positions[0]
        return from_activation(r.hidden)[None]

    def rewind(self, n: int) -> None:
        if n == 0:
            return
        self.timings.rewinds += 1
        self.position -= n
        if self.rewind_mode == "carry":
            self.pending_rewind += n
        else:
            self.inflight = [c.rewind_async(self.sequence_id, n, self.position) for c in self.clients]

    def _settle_rewinds(self) -> None:
        for call in self.inflight:
            call.wait()
        self.inflight = []

    def close(self) -> None:
        """Release this sequence's state on every worker: fire and forget, short deadline
        (recovery from a stalled worker must not wait for its Release to time out)."""
        for c in self.clients:
            try:
                c.release_nowait(self.sequence_id)
            except ValueError:  # the channel is already closed
                pass
