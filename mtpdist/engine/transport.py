"""Where the scheduler's units run: a chain of workers, or a stage in this process.

`send` starts a unit and returns at once; `done(result)` is called later (on any thread)
with a `UnitResult` or the exception. `forward` runs one unit and waits (exact replays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import mlx.core as mx

from ..errors import RequestError, WorkerCallError
from ..wire.client import WorkerClient
from ..wire.types import Activation, ForwardCall, ForwardResult, SequenceRows
from .activations import from_activation, to_activation
from .stage import Stage


@dataclass(frozen=True)
class UnitResult:
    """The last stage's rows of a unit, with per-stage compute time and batch sizes."""
    hidden: Activation | mx.array
    positions: tuple[int, ...]
    compute_us: tuple[int, ...] = ()
    batch_rows: tuple[int, ...] = ()

    def array(self) -> mx.array:
        """The rows as an mx.array [N, H] (call on the MLX thread)."""
        return self.hidden if isinstance(self.hidden, mx.array) else from_activation(self.hidden)


class Transport(Protocol):
    """Runs units of several sequences' rows through the backbone layers."""
    stages: int
    def send(self, rows: Sequence[SequenceRows], hidden: mx.array, done: Callable[[object], None]) -> None: ...
    def forward(self, rows: Sequence[SequenceRows], hidden: mx.array) -> UnitResult: ...
    def release(self, sequence_ids: Sequence[str]) -> None: ...
    def keep(self, sequence_id: str, rewind: int, name: str) -> int | None: ...
    def fork(self, prefix: str, sequence_id: str) -> int | None: ...


class LocalTransport:
    """All layers in this process: a unit runs at once on the calling (MLX) thread."""
    stages = 1

    def __init__(self, stage: Stage):
        self.stage = stage

    def send(self, rows, hidden, done) -> None:
        try:
            out = self.forward(rows, hidden)
        except (RequestError, ValueError) as e:
            done(e)
            return
        done(out)

    def forward(self, rows, hidden) -> UnitResult:
        out = self.stage.forward(list(rows), hidden)
        return UnitResult(out.hidden, tuple(out.positions), (out.compute_us,), (hidden.shape[0],))

    def release(self, sequence_ids) -> None:
        for s in sequence_ids:
            self.stage.release(s)

    def keep(self, sequence_id, rewind, name) -> int | None:
        try:
            return self.stage.keep(sequence_id, rewind, name)
        except RequestError:
            return None

    def fork(self, prefix, sequence_id) -> int | None:
        try:
            return self.stage.fork(prefix, sequence_id)
        except RequestError:
            return None


class WorkerTransport:
    """A chain of workers: the first gets the unit, each passes its output to the next, and the
    last stage's rows come back up the chain."""

    def __init__(self, clients: Sequence[WorkerClient]):
        self.clients = list(clients)
        self.stages = len(self.clients)
        self.rest = tuple(c.address for c in self.clients[1:])
        self.sent_bytes = 0

    def _call(self, rows, hidden: mx.array) -> ForwardCall:
        act = to_activation(hidden)
        self.sent_bytes += 2 * self.stages * len(act.data)
        return ForwardCall(tuple(rows), act, self.rest)

    def send(self, rows, hidden, done) -> None:
        def finished(r: ForwardResult | WorkerCallError) -> None:
            done(r if isinstance(r, Exception) else UnitResult(r.hidden, r.positions, r.compute_us, r.batch_rows))
        self.clients[0].forward_async(self._call(rows, hidden), finished)

    def forward(self, rows, hidden) -> UnitResult:
        r = self.clients[0].forward(self._call(rows, hidden))
        return UnitResult(r.hidden, r.positions, r.compute_us, r.batch_rows)

    def release(self, sequence_ids) -> None:
        """Fire and forget, with a short deadline: a stalled worker must not hold anyone up."""
        for c in self.clients:
            for s in sequence_ids:
                c.release_nowait(s)

    def keep(self, sequence_id, rewind, name) -> int | None:
        """Every worker keeps the sequence's state under `name`; None if any could not."""
        lengths = set()
        for c in self.clients:
            try:
                lengths.add(c.keep(sequence_id, rewind, name))
            except WorkerCallError:
                c.release_nowait(sequence_id)
                return None
        return lengths.pop() if len(lengths) == 1 else None

    def fork(self, prefix, sequence_id) -> int | None:
        """Start `sequence_id` from `prefix` on every worker; None (and nothing left behind) if any lacks it."""
        lengths = set()
        for i, c in enumerate(self.clients):
            try:
                lengths.add(c.fork(prefix, sequence_id))
            except WorkerCallError:
                for done in self.clients[:i]:
                    done.release_nowait(sequence_id)
                return None
        return lengths.pop() if len(lengths) == 1 else None

