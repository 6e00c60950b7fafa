"""Many sequences in flight through the pipeline, driven from the one MLX thread.

`insert` (any thread) queues a request. `run_once` (the MLX thread) handles events, then
`schedule()` (pure: plain state in, units out) says which steps to send as which units, and
each returning unit goes to `apply()`, the only place where results change a sequence's
state. Kept prefixes (`PrefixIndex`) and recovery after a lost worker (`Recovery`) are
collaborators; the network calls they need (Fork, Keep) run off this thread and come back
as events.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Callable

from ..errors import MtpdistError, is_recoverable
from ..wire.types import SequenceRows
from .decoder import Step
from .embeddings import EmbeddingRows
from .depth import BatchDepth, rounds_window
from .generate import GenerationRequest, GenerationResult, Generator, Output
from .plan import Candidate, PlanLimits, plan_units
from .prefix_cache import PrefixEntry, PrefixIndex, boundary_entry, turn_entry
from .live import Backend, LiveSequence, SchedulerSettings, Sink, UnitStats, make_decoder
from .recovery import Recovery
from .rounds import resolve_unit
from .transport import Transport, UnitResult

log = logging.getLogger("mtpdist.engine")


class Scheduler:
    """insert / run_once (cancel through the sink): many sequences over one Backend."""

    def __init__(self, generator: Generator, backend: Backend, settings: SchedulerSettings = SchedulerSettings(),
                 on_result: Callable[[GenerationResult], None] = lambda r: None,
                 on_unit: Callable[[float, UnitResult], None] = lambda wall, r: None):
        """`on_result` hears of each finished request; `on_unit` of each unit back (its wall seconds)."""
        self.generator, self.backend, self.settings, self.on_result = generator, backend, settings, on_result
        self.on_unit = on_unit
        self.head = generator.parts.head
        self.embeddings = EmbeddingRows(self.head)
        self.events: queue.Queue = queue.Queue()
        self.live: dict[str, LiveSequence] = {}
        self.units: dict[int, list[tuple[str, Step]]] = {}
        self.sent_at: dict[int, float] = {}
        self.recovery = Recovery(settings.max_recoveries)
        self.auto_depth = BatchDepth()
        self.prefixes = PrefixIndex(settings.prefix_capacity, settings.prefix_max_bytes)
        self.order = itertools.count()
        self.unit_ids = itertools.count()
        self.queued = 0             # inserted, not yet admitted
        self.control = 0            # Fork/Keep calls out on control threads
        self.stats = UnitStats()
        self.transport = backend.transport()

    # -- any thread ----------------------------------------------------------------------
    def insert(self, req: GenerationRequest, sink: Sink) -> None:
        """Queue a request; its output goes to `sink`."""
        self.queued += 1
        self.events.put(("insert", req, sink))

    @property
    def settled(self) -> bool:
        """Nothing in flight: no unit, no Fork or Keep (tests and benchmarks wait for this)."""
        return not self.units and not self.control and self.events.empty()

    @property
    def load(self) -> int:
        """Requests queued or running."""
        return self.queued + sum(1 for s in self.live.values() if not s.ended)

    def wake(self) -> None:
        self.events.put(("wake",))

    # -- the MLX thread -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set. A scheduler bug ends the requests in flight with an error
        (logged with its traceback) instead of leaving every client waiting on a dead thread."""
        while not stop.is_set():
            try:
                self.run_once(0.05)
            except Exception as e:
                log.exception("the scheduler failed; ending the requests in flight")
                for s in list(self.live.values()):
                    self._end(s, MtpdistError(f"internal error: {e}"))

    def run_once(self, timeout: float) -> None:
        """Send what can go, then handle events for up to `timeout` seconds."""
        self._drop_cancelled()
        if self.recovery.pending and not self.units:
            self._recover()
        while not self.recovery.pending:   # again after each launch: a round may stack on the last
            units = self.schedule()
            if not units:
                break
            for unit in units:
                self._launch(unit)
        if not self.recovery.pending:
            self._draft_ahead()
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event) -> None:
        kind = event[0]
        if kind == "insert":
            self.queued -= 1
            self._admit(event[1], event[2])
        elif kind == "done":
            self.apply(event[1], event[2], event[3])
        elif kind == "forked":
            self.control -= 1
            self._start(event[1], event[2], event[3])
        elif kind == "kept":
            self.control -= 1
            if event[2] is not None:
                self.prefixes.add(event[2])

    # -- admission --------------------------------------------------------------------------
    def _admit(self, req: GenerationRequest, sink: Sink) -> None:
        if sink.cancelled():
            sink.emit(None)
            return
        try:
            self.generator.check(req)
        except (MtpdistError, ValueError) as e:
            sink.emit(e if isinstance(e, MtpdistError) else MtpdistError(str(e)))
            sink.emit(None)
            return
        if not any(not s.ended for s in self.live.values()) and not self.units:
            self.backend.prepare()          # membership changes are picked up between requests
            self._use(self.backend.transport())
        s = LiveSequence(uuid.uuid4().hex, req, sink, next(self.order))
        self.live[s.key] = s
        entry = self.prefixes.match(req.prompt_ids, need_mtp=req.mtp) if self.settings.reuse_prefixes else None
        if entry is None:
            self._start(s.key, None, None)
            return
        self.control += 1
        self.transport.fork_async(entry.name, s.wire_id,
                                  lambda n, key=s.key, e=entry: self.events.put(("forked", key, e, n)))

    def _start(self, key: str, entry: PrefixEntry | None, length: int | None) -> None:
        """Build the sequence's decoder: from a kept prefix the workers forked, or from scratch."""
        s = self.live.get(key)
        if s is None or s.ended:         # cancelled while its prefix was being forked
            if length is not None:
                self.transport.release([key])
            return
        if entry is not None and length != len(entry.tokens):
            self.prefixes.drop(entry.name)
            if length is not None:       # forked, but not to the same length everywhere: start afresh
                self.transport.release([s.wire_id])
                s.wire_id = uuid.uuid4().hex
            entry = None
        req = s.req
        try:
            s.decoder = make_decoder(self.generator, req, self.auto_depth, entry)
        except (MtpdistError, ValueError) as e:
            self._end(s, e if isinstance(e, MtpdistError) else MtpdistError(str(e)))
            return
        s.output = Output(self.generator, req)
        s.output.cached_tokens = s.decoder.start
        if entry is not None:
            s.log, s.inherited = list(entry.log), len(entry.log)
        if self.settings.reuse_prefixes:   # message boundaries and the end of the prompt
            s.keep_at = {p: f"{key}:{p}" for p in s.decoder.cuts
                         if p > s.decoder.start and p >= self.settings.prefix_min_tokens}

    def _use(self, transport: Transport) -> None:
        if transport is not self.transport:
            self.prefixes.clear()         # a new plan: the workers kept nothing for us
        self.transport = transport

    # -- sending --------------------------------------------------------------------------
    def schedule(self) -> list[list[tuple[str, int]]]:
        """The units to send now, as (sequence key, rows): a function of the live state (each
        decoder is told its rounds window first)."""
        limits = PlanLimits(self.transport.stages, self.settings.max_inflight or self.transport.stages,
                            min(self.settings.prefill_budget, self.generator.prefill_step),
                            self.settings.max_unit_sequences)
        running = [s for s in self.live.values() if not s.ended and s.decoder is not None]
        active = len(running)
        self.auto_depth.active = active
        cands = []
        for s in running:
            # The window first: what `peek` promises here, `next_step` must send at launch.
            s.decoder.window = rounds_window(self.settings.rounds_in_flight, self.transport.stages, active,
                                             s.decoder.depth)
            if s.replay is not None:
                if not s.replay.inflight and s.replay.steps:
                    cands.append(Candidate(s.key, "replay", len(s.replay.steps[0][0].tokens), s.order))
                continue
            peek = s.decoder.peek()
            if peek is not None:
                cands.append(Candidate(s.key, peek[0], peek[1], s.order, s.decoder.body - s.decoder.sent_prefill))
        return plan_units(cands, len(self.units), active, limits)

    def _take(self, s: LiveSequence, rows: int) -> tuple[Step, Step | None]:
        """The step a planned unit carries for `s`, and the step whose result it is (None: a
        replay of the log, whose result is not used)."""
        if s.replay is not None:
            return s.replay.take()
        step = s.decoder.next_step()
        return step, step

    def _launch(self, unit: list[tuple[str, int]]) -> None:
        members = [(key, *self._take(self.live[key], rows)) for key, rows in unit]
        uid = next(self.unit_ids)
        self.units[uid] = [(key, orig or step) for key, step, orig in members]
        rows = []
        for key, step, _ in members:
            s = self.live[key]
            s.inflight += 1
            end = step.position + len(step.tokens)
            keep = s.keep_at.get(end, "") if step.kind == "prefill" and s.replay is None else ""
            rows.append(SequenceRows(s.wire_id, step.position, len(step.tokens), step.epoch, step.snapshots, keep,
                                     step.floor))
        self.sent_at[uid] = time.perf_counter()
        hidden = self.embeddings.activation([t for _, step, _ in members for t in step.tokens])
        self.stats.sent(len(members))
        self.transport.send(rows, hidden, lambda r, uid=uid: self.events.put(("done", uid, r, time.perf_counter())))

    def _draft_ahead(self) -> None:
        """While nothing has come back: draft the next stacked rounds a pass at a time (a returning
        unit waits for one pass at most), so each goes out as soon as a round returns."""
        for s in list(self.live.values()):
            try:
                while self.events.empty() and s.draft_ahead():
                    pass
            except Exception as e:   # never let one sequence take the others down
                log.exception("drafting failed")
                self._end(s, MtpdistError(f"internal error: {e}"))

    # -- results ----------------------------------------------------------------------------
    def apply(self, uid: int, result, at: float) -> None:
        """A unit came back: the only place where results change sequences' state."""
        members = self.units.pop(uid)
        sent = self.sent_at.pop(uid)
        for key, _ in members:
            if key in self.live:
                self.live[key].inflight -= 1
        if isinstance(result, BaseException):
            self._unit_failed(members, result)
        else:
            self.recovery.unit_succeeded()
            self.stats.back(result, at - sent)
            self.on_unit(at - sent, result)
            self._deliver(members, result)
        for key, _ in members:
            self._maybe_release(key)

    def _deliver(self, members: list[tuple[str, Step]], result: UnitResult) -> None:
        hidden = result.array()
        r, rounds = 0, []
        for key, step in members:
            n = len(step.tokens)
            rows, r = hidden[r:r + n][None], r + n
            s = self.live.get(key)
            if s is None or s.ended:
                continue
            if s.replay is not None:
                orig, over = s.replay.back()
                s.replay = None if over else s.replay
                if orig is None:
                    continue
            if step.kind == "prefill":
                s.log.append(step)
                self._guard(s, lambda s=s, step=step, rows=rows:
                            s.decoder.prefilled(step, rows, lambda end, s=s: self._kept_at(s, end)) or [])
            elif s.decoder.in_flight(step):     # else a round a rejection before it made void
                s.early[id(step)] = (step, rows)
                rounds.append(s)
        while rounds:        # each sequence's oldest round in flight, if it is back
            unique = list({s.key: s for s in rounds}.values())
            ready = [(s, *s.early.pop(id(s.decoder.rounds[0].step))) for s in unique
                     if not s.ended and s.decoder.rounds and id(s.decoder.rounds[0].step) in s.early]
            if not ready:
                return
            for s, step, _ in ready:
                s.log.append(step)
            try:
                outs = resolve_unit(self.head, [(s.decoder, step, rows) for s, step, rows in ready])
            except Exception as e:
                log.exception("decoding failed")
                for s, _, _ in ready:
                    self._end(s, MtpdistError(f"internal error: {e}"))
                return
            for (s, _, _), tokens in zip(ready, outs):
                self._guard(s, lambda tokens=tokens: tokens)
                if s.replay is not None and not s.replay.drop_voided(s.decoder):
                    s.replay = None
            rounds = [s for s, _, _ in ready if s.early]

    def _guard(self, s: LiveSequence, decode) -> None:
        """Run one sequence's part of a result and hand its new text to its sink."""
        try:
            tokens = decode()
            delta = s.output.add(tokens, s.decoder.take_logprobs()) if tokens else None
        except Exception as e:  # never let one sequence take the others down
            log.exception("decoding failed")
            self._end(s, MtpdistError(f"internal error: {e}"))
            return
        if delta is not None:
            s.sink.emit(delta)
        if s.output.done:
            self._finish(s)

    # -- kept prefixes ------------------------------------------------------------------------
    def _kept_at(self, s: LiveSequence, end: int) -> None:
        """A prefill chunk ending at a kept position was applied: the workers keep that state."""
        name = s.keep_at.pop(end, None)
        if name is not None:
            self.prefixes.add(boundary_entry(name, s.req.prompt_ids, end, s.decoder, s.replay_log(upto=end)))

    def _keep_turn(self, s: LiveSequence) -> None:
        """Keep a finished sequence's state, so that the next turn of a chat continues from it."""
        d = s.decoder
        length = len(d.prompt) + len(d.confirmed) - 1   # the cache once voided rows are gone
        if length < self.settings.prefix_min_tokens or d.prefilling or s.replay is not None:
            return
        name = f"{s.key}:turn"
        entry = turn_entry(name, s.req.prompt_ids, d, s.replay_log())

        def kept(n: int | None) -> None:
            self.events.put(("kept", name, entry if n == length else None))
        self.control += 1
        self.transport.keep_async(s.wire_id, length, name, kept)
        s.kept = True

    # -- endings ------------------------------------------------------------------------------
    def _finish(self, s: LiveSequence) -> None:
        last = s.output.finish(s.decoder.stats)
        if self.settings.reuse_prefixes and s.inflight:
            s.keep_turn = True          # once its rounds in flight are back (see _maybe_release)
        elif self.settings.reuse_prefixes:
            self._keep_turn(s)
        s.sink.emit(last)
        self.on_result(last.result)
        self._end(s, None)

    def _end(self, s: LiveSequence, error: Exception | None) -> None:
        if s.ended:
            return
        if error is not None:
            s.sink.emit(error)
        s.sink.emit(None)
        s.ended = True
        self._maybe_release(s.key)

    def _maybe_release(self, key: str) -> None:
        s = self.live.get(key)
        if s is not None and s.ended and s.inflight == 0:
            if s.keep_turn:      # only now: no round of it is left in any worker's queue
                s.keep_turn = False
                self._keep_turn(s)
            del self.live[key]
            if not s.kept and (s.log or (s.decoder is not None and s.decoder.chunks)):
                self.transport.release([s.wire_id])

    def _drop_cancelled(self) -> None:
        for s in list(self.live.values()):
            if not s.ended and s.sink.cancelled():
                log.info("client went away; stopping its generation")
                self._end(s, None)

    # -- failures -------------------------------------------------------------------------------
    def _unit_failed(self, members, err: BaseException) -> None:
        if is_recoverable(err):
            self.recovery.unit_failed(members, err)
            return
        log.error("a forward failed: %s", err)
        for key, _ in members:
            s = self.live.get(key)
            if s is not None:
                self._end(s, MtpdistError(f"generation failed: {err}"))

    def _recover(self) -> None:
        """Every unit is back: re-plan, then queue each live sequence's exact replay."""
        error = self.recovery.recover(self.backend, self.live)
        if error is not None:
            for s in list(self.live.values()):
                self._end(s, error if isinstance(error, MtpdistError) else MtpdistError(str(error)))
            return
        self.prefixes.clear()
        self.transport = self.backend.transport()
