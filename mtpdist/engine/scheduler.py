"""Many sequences in flight through the pipeline, driven from the one MLX thread.

`insert` (any thread) adds a request; `run` (the MLX thread) loops: pick the steps to send
with `plan_units`, embed and send them as units, and turn each returning unit into tokens
through every member's `SequenceDecoder`. A request ends when its output is done or its
sink says it was cancelled; its state is then released on every worker.

When a unit fails because a worker or its state is gone, sending stops, the units in flight
drain, the backend re-plans over the workers still alive, and every live sequence replays
its log of steps exactly (same chunks, same rewinds), then its failed steps. Other errors
end only the sequences of that unit, with one clear message each.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import mlx.core as mx

from ..errors import MtpdistError, WorkerCallError, is_worker_loss
from ..model.cache import copy_caches
from ..wire.types import SequenceRows
from .batch_decode import batchable, deliver_greedy
from .decoder import SequenceDecoder, Step
from .depth import BatchDepth, FixedDepth
from .generate import Delta, GenerationRequest, GenerationResult, Generator, Output
from .plan import Candidate, PlanLimits, plan_units
from .prefix import PrefixEntry, PrefixIndex
from .sampling import Sampler
from .transport import Transport, UnitResult

log = logging.getLogger("mtpdist.engine")


def is_recoverable(err: BaseException) -> bool:
    """A lost worker or lost state: re-plan and replay. Anything else is reported once."""
    return isinstance(err, WorkerCallError) and is_worker_loss(err.code, err.details)


class Sink(Protocol):
    """Where a request's output goes: Deltas, then an exception or None at the end."""
    def emit(self, item: Delta | Exception | None) -> None: ...
    def cancelled(self) -> bool: ...


class Backend(Protocol):
    """The layers' side: the current transport, membership changes, recovery."""
    def transport(self) -> Transport: ...
    def prepare(self) -> None: ...
    def recover(self) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    """Limits of the scheduler."""
    max_inflight: int = 0            # units in flight; 0 = one per stage
    prefill_budget: int = 512        # prefill rows per unit
    max_unit_sequences: int = 64
    max_recoveries: int = 3          # consecutive failed recoveries before giving up
    reuse_prefixes: bool = True      # keep finished turns and prompts; continue later requests from them
    prefix_min_tokens: int = 16      # shorter prompts are not worth keeping
    prefix_capacity: int = 64


@dataclass
class _Live:
    key: str
    req: GenerationRequest
    decoder: SequenceDecoder
    output: Output
    sink: Sink
    order: int
    log: list[Step] = field(default_factory=list)  # completed steps (from position 0), for exact replay
    inflight: int = 0
    ended: bool = False
    carry: int = 0                   # a kept prefix's final rewind, folded into the first own step
    save_prompt: str = ""            # the name the end-of-prompt state is kept under, until it is
    kept: bool = False               # its state was kept for reuse instead of released
    wire: str = ""                   # the sequence's id on the workers (new after each recovery)

    def __post_init__(self):
        self.wire = self.wire or self.key


class Scheduler:
    """insert / run / (cancel through the sink): many sequences over one Backend."""

    def __init__(self, generator: Generator, backend: Backend, settings: SchedulerSettings = SchedulerSettings(),
                 on_result: Callable[[GenerationResult], None] = lambda r: None,
                 on_unit: Callable[[float, UnitResult], None] = lambda wall, r: None):
        """`on_result` hears of each finished request; `on_unit` of each unit back (its wall seconds)."""
        self.generator, self.backend, self.settings, self.on_result = generator, backend, settings, on_result
        self.on_unit = on_unit
        self.head = generator.parts.head
        self.events: queue.Queue = queue.Queue()
        self.live: dict[str, _Live] = {}
        self.units: dict[int, list[tuple[str, Step]]] = {}
        self.failed: list[tuple[list[tuple[str, Step]], BaseException]] = []
        self.auto_depth = BatchDepth()
        self.prefixes = PrefixIndex(settings.prefix_capacity)
        self.order = itertools.count()
        self.unit_ids = itertools.count()
        self.recoveries = 0
        self.waiting = 0            # inserted, not yet admitted
        self.stats = {"units": 0, "unit_sequences": 0, "max_unit_sequences": 0, "max_stage_rows": 0,
                      "unit_wall_s": 0.0, "unit_compute_s": 0.0, "units_done": 0}
        self.sent_at: dict[int, float] = {}
        self.transport = backend.transport()

    # -- any thread ----------------------------------------------------------------------
    def insert(self, req: GenerationRequest, sink: Sink) -> None:
        """Queue a request; its output goes to `sink`."""
        self.waiting += 1
        self.events.put(("insert", req, sink))

    @property
    def depth(self) -> int:
        """Requests queued or running."""
        return self.waiting + sum(1 for s in self.live.values() if not s.ended)

    def wake(self) -> None:
        self.events.put(("wake",))

    # -- the MLX thread -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set."""
        while not stop.is_set():
            self.run_once(0.05)

    def run_once(self, timeout: float) -> None:
        """Send what can go, then handle events for up to `timeout` seconds."""
        self._drop_cancelled()
        if self.failed and not self.units:
            self._recover()
        if not self.failed:
            self._send_ready()
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
        if event[0] == "insert":
            self.waiting -= 1
            self._admit(event[1], event[2])
        elif event[0] == "done":
            self._done(event[1], event[2], event[3])

    def _admit(self, req: GenerationRequest, sink: Sink) -> None:
        if sink.cancelled():
            sink.emit(None)
            return
        try:
            self.generator.check(req)
            if not any(not s.ended for s in self.live.values()) and not self.units:
                self.backend.prepare()          # membership changes are picked up between requests
                self._use(self.backend.transport())
            depth = (self.auto_depth if req.mtp_depth == "auto" else FixedDepth(int(req.mtp_depth))) \
                if req.mtp else None
            key = uuid.uuid4().hex
            drafter = self.generator.drafter(req)
            base = self._fork(key, req) if self.settings.reuse_prefixes else None
            if base is not None and drafter is not None:
                drafter.caches = copy_caches(base.mtp_caches)
            dec = SequenceDecoder(self.head, Sampler(req.sampling), req.prompt_ids, drafter, depth,
                                  self.generator.prefill_step, start=len(base.tokens) if base else 0)
            dec.logprobs_top = req.logprobs
        except (MtpdistError, ValueError) as e:
            sink.emit(e if isinstance(e, MtpdistError) else MtpdistError(str(e)))
            sink.emit(None)
            return
        out = Output(self.generator, req)
        out.cached_tokens = dec.start
        s = self.live[key] = _Live(key, req, dec, out, sink, next(self.order))
        if base is not None:
            s.log, s.carry = list(base.log), base.rewind
        elif self.settings.reuse_prefixes and dec.body >= self.settings.prefix_min_tokens:
            s.save_prompt = f"{key}:prompt"

    def _use(self, transport: Transport) -> None:
        if transport is not self.transport:
            self.prefixes.clear()         # a new plan: the workers kept nothing for us
        self.transport = transport

    def _fork(self, key: str, req: GenerationRequest):
        """Start `key` from the longest kept prefix of its prompt, if the workers still hold it."""
        entry = self.prefixes.match(req.prompt_ids, need_mtp=req.mtp)
        if entry is None:
            return None
        if self.transport.fork(entry.name, key) != len(entry.tokens):
            self.prefixes.drop(entry.name)
            return None
        return entry

    def _send_ready(self) -> None:
        # Prefill rows per unit stay within the chunk size the workers were told to accept.
        limits = PlanLimits(self.transport.stages, self.settings.max_inflight or self.transport.stages,
                            min(self.settings.prefill_budget, self.generator.prefill_step),
                            self.settings.max_unit_sequences)
        while True:
            cands, active = [], 0
            for s in self.live.values():
                if s.ended:
                    continue
                active += 1
                peek = s.decoder.peek()
                if peek is not None:
                    cands.append(Candidate(s.key, peek[0], peek[1], s.order,
                                           s.decoder.body - s.decoder.sent_prefill))
            self.auto_depth.active = active
            units = plan_units(cands, len(self.units), active, limits)
            if not units:
                return
            for unit in units:
                self._send([(key, self.live[key].decoder.next_step(rows)) for key, rows in unit])

    def _rows(self, members: list[tuple[str, Step]], save: bool = False) -> tuple[list[SequenceRows], mx.array]:
        rows = [SequenceRows(self.live[k].wire, st.position, len(st.tokens), st.rewind, st.keep,
                             self._save_name(k, st) if save else "") for k, st in members]
        tokens = [t for _, st in members for t in st.tokens]
        return rows, self.head.embed(mx.array(tokens))

    def _send(self, members: list[tuple[str, Step]]) -> None:
        uid = next(self.unit_ids)
        self.units[uid] = members
        for key, _ in members:
            self.live[key].inflight += 1
        rows, hidden = self._rows(members, save=True)
        st = self.stats
        st["units"] += 1
        st["unit_sequences"] += len(members)
        st["max_unit_sequences"] = max(st["max_unit_sequences"], len(members))
        self.sent_at[uid] = time.perf_counter()
        self.transport.send(rows, hidden, lambda r, uid=uid: self.events.put(("done", uid, r, time.perf_counter())))

    def _save_name(self, key: str, step: Step) -> str:
        s = self.live[key]
        last = step.kind == "prefill" and step.position + len(step.tokens) == s.decoder.body
        return s.save_prompt if last else ""

    def _done(self, uid: int, result, at: float) -> None:
        members = self.units.pop(uid)
        sent = self.sent_at.pop(uid)
        for key, _ in members:
            if key in self.live:
                self.live[key].inflight -= 1
        if isinstance(result, BaseException):
            self._unit_failed(members, result)
        else:
            self.recoveries = 0
            st = self.stats
            st["max_stage_rows"] = max(st["max_stage_rows"], *result.batch_rows, 0)
            st["unit_wall_s"] += at - sent
            st["unit_compute_s"] += sum(result.compute_us) / 1e6
            st["units_done"] += 1
            self.on_unit(at - sent, result)
            self._deliver(members, result)
        for key, _ in members:
            self._maybe_release(key)

    def _deliver(self, members: list[tuple[str, Step]], result: UnitResult) -> None:
        hidden = result.array()
        r, batch = 0, []
        for key, step in members:
            n = len(step.tokens)
            rows, r = hidden[r:r + n][None], r + n
            s = self.live.get(key)
            if s is None or s.ended:
                continue
            if s.carry:
                step, s.carry = replace(step, rewind=step.rewind + s.carry), 0
            s.log.append(step)
            if batchable(s.decoder, step):
                batch.append((s, step, rows))
            else:
                self._apply(s, lambda s=s, step=step, rows=rows: s.decoder.on_result(step, rows))
        if batch:
            try:  # greedy sequences: the head's work for all of them at once
                outs = deliver_greedy(self.head, [(s.decoder, step, rows) for s, step, rows in batch])
            except Exception as e:
                log.exception("decoding failed")
                for s, _, _ in batch:
                    self._end(s, MtpdistError(f"internal error: {e}"))
                return
            for (s, _, _), tokens in zip(batch, outs):
                self._apply(s, lambda tokens=tokens: tokens)

    def _apply(self, s: _Live, decode) -> None:
        """Run one sequence's decoding of a result and hand its new text to its sink."""
        try:
            tokens = decode()
            if s.save_prompt and not s.decoder.prefilling:
                self._kept_prompt(s)
            delta = s.output.add(tokens, s.decoder.take_logprobs()) if tokens else None
        except Exception as e:  # never let one sequence take the others down
            log.exception("decoding failed")
            self._end(s, MtpdistError(f"internal error: {e}"))
            return
        if delta is not None:
            s.sink.emit(delta)
        if s.output.done:
            self._finish(s)

    def _kept_prompt(self, s: _Live) -> None:
        d = s.decoder
        self.prefixes.add(PrefixEntry(s.save_prompt, tuple(s.req.prompt_ids[:d.body]), tuple(s.log), 0,
                                      self._mtp_copy(d)))
        s.save_prompt = ""

    @staticmethod
    def _mtp_copy(d: SequenceDecoder):
        caches = getattr(d.drafter, "caches", None)
        return copy_caches(caches) if caches is not None else None

    def _keep_turn(self, s: _Live) -> None:
        """Keep a finished sequence's state, so that the next turn of a chat continues from it."""
        d = s.decoder
        length = d.position - d.rewind
        if length < self.settings.prefix_min_tokens or d.waiting or d.prefilling:
            return
        d.settle_drafter()
        name = f"{s.key}:turn"
        if self.transport.keep(s.wire, d.rewind, name) != length:
            return
        tokens = (*s.req.prompt_ids, *d.confirmed[:-1])
        self.prefixes.add(PrefixEntry(name, tokens, tuple(s.log), d.rewind, self._mtp_copy(d)))
        s.kept = True

    def _finish(self, s: _Live) -> None:
        last = s.output.finish(s.decoder.stats)
        if self.settings.reuse_prefixes:
            self._keep_turn(s)
        s.sink.emit(last)
        self.on_result(last.result)
        self._end(s, None)

    def _end(self, s: _Live, error: Exception | None) -> None:
        if error is not None:
            s.sink.emit(error)
        s.sink.emit(None)
        s.ended = True
        self._maybe_release(s.key)

    def _maybe_release(self, key: str) -> None:
        s = self.live.get(key)
        if s is not None and s.ended and s.inflight == 0:
            del self.live[key]
            if not s.kept and (s.log or s.decoder.chunks):
                self.transport.release([s.wire])

    def _drop_cancelled(self) -> None:
        for s in list(self.live.values()):
            if not s.ended and s.sink.cancelled():
                log.info("client went away; stopping its generation")
                self._end(s, None)

    # -- failures ---------------------------------------------------------------------------
    def _unit_failed(self, members, err: BaseException) -> None:
        if is_recoverable(err):
            log.warning("lost a worker or its state (%s); pausing to re-plan", err)
            self.failed.append((members, err))
            return
        log.error("a forward failed: %s", err)
        for key, _ in members:
            s = self.live.get(key)
            if s is not None and not s.ended:
                self._end(s, MtpdistError(f"generation failed: {err}"))

    def _recover(self) -> None:
        """Every unit is back: re-plan, then replay each live sequence exactly."""
        failed, self.failed = self.failed, []
        retry: dict[str, list[Step]] = {}
        for members, _ in failed:
            for key, step in members:
                retry.setdefault(key, []).append(step)
        while True:
            self.recoveries += 1
            if self.recoveries > self.settings.max_recoveries:
                err = MtpdistError(f"gave up after {self.settings.max_recoveries} recoveries; last failure: "
                                   f"{failed[-1][1]}")
                for s in list(self.live.values()):
                    if not s.ended:
                        self._end(s, err)
                return
            if self.recoveries > 1:  # let restarting workers and reconnecting channels settle
                time.sleep(min(0.25 * 2 ** (self.recoveries - 2), 2.0))
            try:
                self.backend.recover()
                self.prefixes.clear()
                self.transport = self.backend.transport()
                for s in list(self.live.values()):
                    if not s.ended:
                        # A fresh id: a worker that survived may still hold the old state.
                        self.transport.release([s.wire])
                        s.wire = uuid.uuid4().hex
                for s in list(self.live.values()):
                    if not s.ended:
                        self._replay(s, sorted(retry.get(s.key, []), key=lambda st: st.position))
                return
            except MtpdistError as e:
                if isinstance(e, WorkerCallError) and not is_recoverable(e):
                    raise
                failed.append(([], e))
                log.warning("recovery failed (%s); trying again", e)

    def _replay(self, s: _Live, retry: list[Step]) -> None:
        log.info("replaying %d steps of a sequence", len(s.log))
        for step in s.log:
            rows, hidden = self._rows([(s.key, step)])
            self.transport.forward(rows, hidden)
        for step in retry:
            rows, hidden = self._rows([(s.key, step)])
            result = self.transport.forward(rows, hidden)
            self._deliver([(s.key, step)], result)


class CollectingSink:
    """A Sink that keeps everything (benchmarks, tests, the CLI): `wait()` returns the result."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.error: Exception | None = None
        self.result: GenerationResult | None = None
        self.first_token_at: float | None = None
        self.created = time.perf_counter()
        self.ended = threading.Event()
        self.cancel = threading.Event()

    def emit(self, item) -> None:
        if item is None:
            self.ended.set()
        elif isinstance(item, Exception):
            self.error = item
        else:
            if self.first_token_at is None and item.token_ids:
                self.first_token_at = time.perf_counter()
            self.deltas.append(item)
            if item.result is not None:
                self.result = item.result

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self.ended.wait(timeout):
            raise MtpdistError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


def run_all(scheduler: Scheduler, requests: list[GenerationRequest], timeout: float = 300.0,
            stagger: float = 0.0) -> list[CollectingSink]:
    """Insert every request (optionally `stagger` seconds apart) and drive the scheduler on this
    thread until all have ended. The caller's thread must be the one that owns MLX."""
    sinks: list[CollectingSink] = []
    end = time.monotonic() + timeout
    next_at = time.monotonic()
    while len(sinks) < len(requests) or not all(s.ended.is_set() for s in sinks):
        if len(sinks) < len(requests) and time.monotonic() >= next_at:
            sink = CollectingSink()
            scheduler.insert(requests[len(sinks)], sink)
            sinks.append(sink)
            next_at = time.monotonic() + stagger
            continue
        if time.monotonic() > end:
            raise MtpdistError(f"requests did not finish within {timeout:.0f}s")
        scheduler.run_once(0.002 if stagger else 0.02)
    return sinks
