"""A worker's sequence store in this process, behind the coordinator's Transport protocol:
`mtpdist generate` and `bench` without workers, and tests, run every layer here through the
same scheduler the server uses (one stage, no network)."""

from __future__ import annotations

from mtpdist.engine.transport import UnitResult
from mtpdist.errors import RequestError, WorkerCallError
from mtpdist.model.qwen35 import LayerStack
from mtpdist.wire.activations import from_activation

from .sequences import SequenceStore

_HERE = "in-process"


class LocalTransport:
    """All layers in this process: a unit runs at once on the calling (MLX) thread."""
    stages = 1

    def __init__(self, stack: LayerStack, hidden_size: int):
        self.store = SequenceStore(stack, hidden_size)

    def send(self, rows, hidden, done) -> None:
        try:
            out = self.store.forward(list(rows), from_activation(hidden))
            self.store.tidy()
        except RequestError as e:    # answered as a worker would, so the same recovery rules apply
            done(WorkerCallError(_HERE, e.kind, e.kind, str(e)))
            return
        done(UnitResult(out.hidden, tuple(out.positions), (out.compute_us,), (hidden.shape[0],)))

    def release(self, sequence_ids) -> None:
        for s in sequence_ids:
            self.store.release(s)

    def keep_async(self, sequence_id, length, name, done) -> None:
        try:
            done(self.store.keep(sequence_id, length, name))
        except RequestError:
            self.store.release(sequence_id)
            done(None)

    def fork_async(self, prefix, sequence_id, done) -> None:
        try:
            done(self.store.fork(prefix, sequence_id))
        except RequestError:
            done(None)

    def close(self) -> None:
        pass
