"""After a lost worker or lost state: re-plan over the workers still alive, then replay.

Every live sequence gets a fresh id on the workers and its log of confirmed steps (from
position 0: the same chunks, the same rewinds, so the same arithmetic) queued for replay
ahead of the steps that failed; the scheduler sends them through its ordinary path, one
step of a sequence at a time, and only the failed steps' results are used. Greedy output is
then identical to an undisturbed run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

from ..errors import MtpdistError, WorkerCallError
from .decoder import Step

log = logging.getLogger("mtpdist.engine")


@dataclass
class Replay:
    """Steps a sequence must send again, as (step sent, original or None): an original's
    result is delivered as that step's (a round the decoder still waits on)."""
    steps: deque[tuple[Step, Step | None]]
    inflight: bool = False

    def take(self) -> tuple[Step, Step | None]:
        """The next step to send again (one at a time), and the step whose result it is."""
        self.inflight = True
        return self.steps[0]

    def back(self) -> tuple[Step | None, bool]:
        """The step just sent came back: (its original, or None for a log step; whether the
        replay is over)."""
        _, orig = self.steps.popleft()
        self.inflight = False
        return orig, not self.steps

    def drop_voided(self, decoder) -> bool:
        """Forget owed rounds a result just voided (they must not be sent); whether any is left."""
        self.steps = deque(e for e in self.steps if e[1] is None or e[1].kind == "prefill"
                           or decoder.in_flight(e[1]))
        return bool(self.steps)


def renumber(steps: list[Step]) -> list[Step]:
    """The steps with epochs for a fresh sequence: a new epoch wherever a step starts before
    the end of the one before it (rows the original run voided are taken back there)."""
    out, epoch, end = [], 0, 0
    for st in steps:
        if st.position < end:
            epoch += 1
        out.append(replace(st, epoch=epoch, floor=0))
        end = st.position + len(st.tokens)
    return out


class Recovery:
    """Collects failed units until every unit is back, then re-plans and queues replays."""

    def __init__(self, max_recoveries: int = 3):
        self.max_recoveries = max_recoveries
        self.failed: list[tuple[list[tuple[str, Step]], BaseException]] = []
        self.attempts = 0   # consecutive recoveries without a unit coming back in between

    @property
    def pending(self) -> bool:
        return bool(self.failed)

    def unit_failed(self, members: list[tuple[str, Step]], err: BaseException) -> None:
        log.warning("lost a worker or its state (%s); pausing to re-plan", err)
        self.failed.append((members, err))

    def unit_succeeded(self) -> None:
        self.attempts = 0

    def recover(self, backend, live: dict) -> Exception | None:
        """Re-plan and queue each live sequence's replay; returns the error that ends every live
        sequence when recovery gives up, else None."""
        failed, self.failed = self.failed, []
        retry: dict[str, list[Step]] = {}
        for members, _ in failed:
            for key, step in members:
                retry.setdefault(key, []).append(step)
        last: BaseException = failed[-1][1]
        while True:
            self.attempts += 1
            if self.attempts > self.max_recoveries:
                return MtpdistError(f"gave up after {self.max_recoveries} recoveries; last failure: {last}")
            if self.attempts > 1:  # let restarting workers and reconnecting channels settle
                time.sleep(min(0.25 * 2 ** (self.attempts - 2), 2.0))
            try:
                backend.recover()
            except MtpdistError as e:
                if isinstance(e, WorkerCallError) and not e.recoverable:
                    return e
                last = e
                log.warning("recovery failed (%s); trying again", e)
                continue
            transport = backend.transport()
            for s in live.values():
                if s.ended or s.decoder is None:
                    continue
                transport.release([s.wire_id])      # a surviving worker may still hold the old state
                s.wire_id = uuid.uuid4().hex
                # Steps whose results are still owed: those of failed units (not replays of the
                # log) and those an interrupted replay had not delivered yet.
                log_steps = s.replay_log()
                owed = [st for st in retry.get(s.key, []) if st not in s.log
                        and (st.kind == "prefill" or s.decoder.in_flight(st))]   # not a voided round
                if s.replay is not None:
                    owed += [orig for _, orig in s.replay.steps if orig is not None and orig not in owed]
                again = sorted(owed, key=lambda st: (st.position, st.index))
                log.info("replaying %d steps of a sequence", len(log_steps))
                steps = renumber(log_steps + again)
                if again:   # rounds stacked on the first owed one may still be rejected back to it
                    steps[len(log_steps):] = [replace(st, floor=again[0].position) for st in steps[len(log_steps):]]
                s.replay = Replay(deque([(st, None) for st in steps[:len(log_steps)]]
                                        + list(zip(steps[len(log_steps):], again))))
                # Newer than any replayed step: the decoder's next step goes back to where it starts.
                s.decoder.epoch = (steps[-1].epoch + 1) if steps else s.decoder.epoch + 1
            return None
