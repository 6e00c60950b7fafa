"""A trunk that survives losing a worker mid-generation.

It keeps the sequence's log of forwards and rewinds. When a worker fails, the session
re-plans over the workers still alive and re-loads shards; the log is replayed exactly
(same chunks, same rewinds, so the same arithmetic) on a fresh sequence, and the failed
forward is retried. Greedy output is then identical to an undisturbed run.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from mtpdist.errors import MtpdistError, WorkerCallError, is_worker_loss  # noqa: F401 (re-exported)

log = logging.getLogger("mtpdist.coordinator")
class ResilientTrunk:
    """A sequence's trunk that recovers from losing workers by re-planning and exact replay."""
    def __init__(self, session, max_recoveries: int = 3):
        self.session, self.max_recoveries = session, max_recoveries
        self.inner = session.raw_trunk()
        self.ops: list[tuple] = []  # ("f", hidden, keep) or ("r", n)
        self.recoveries = 0

    @property
    def offset(self) -> int:
        return self.inner.offset

    @property
    def timings(self):
        return self.inner.timings

    def forward(self, hidden, keep: Sequence[int] = ()):
        out = self._with_recovery(lambda: self.inner.forward(hidden, keep))
        self.ops.append(("f", hidden, tuple(keep)))
        return out

    def rewind(self, n: int) -> None:
        self.inner.rewind(n)
        self.ops.append(("r", n))

    def _with_recovery(self, fn):
        while True:
            try:
                return fn()
            except WorkerCallError as e:
                if not is_worker_loss(e.code, e.details):
                    raise
                self._recover(e)

    def _recover(self, err: WorkerCallError) -> None:
        while True:
            self.recoveries += 1
            if self.recoveries > self.max_recoveries:
                raise MtpdistError(f"gave up after {self.max_recoveries} recoveries; last failure: {err}")
            log.warning("lost a worker (%s); re-planning and replaying %d steps", err, len(self.ops))
            if self.recoveries > 1:  # let restarting workers and reconnecting channels settle
                time.sleep(min(0.25 * 2 ** (self.recoveries - 2), 2.0))
            self.inner.close()
            self.session.recover()  # raises MtpdistError when the model no longer fits
            self.inner = self.session.raw_trunk()
            try:
                for op in self.ops:
                    if op[0] == "f":
                        self.inner.forward(op[1], op[2])
                    else:
                        self.inner.rewind(op[1])
                return
            except WorkerCallError as e:
                if not is_worker_loss(e.code, e.details):
                    raise
                err = e

    def close(self) -> None:
        self.inner.close()
