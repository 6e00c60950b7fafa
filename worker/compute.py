"""The worker's one MLX thread. Forwards that wait in its queue together run as one batch.

gRPC threads hand work here and block on the answer. A Forward whose sequence still waits
for an earlier chunk (chunks of one sequence may arrive out of order from the previous
stage) is held back until that chunk has run. Other work (loading, rewinds, releases,
state sizes) runs alone, in order.

The ring's socket links (inlets) are read by this thread itself: while it has nothing to
do it waits on them and on a wake-up pipe together, and before each batch it takes the
frames already there, so a unit's frame reaches its compute without waking another thread.
A big frame (a prefill chunk) is read by a helper thread instead, so that its transfer
overlaps the compute before it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from mtpdist.errors import RequestError
from mtpdist.wire.types import Activation, ForwardCall

log = logging.getLogger("mtpdist.worker")
BIG_FRAME = 1 << 20      # frames larger than this are read off the MLX thread
_DRAIN_MAX = 64          # frames taken from the inlets before one batch


@dataclass(frozen=True)
class StageEmulation:
    """Benchmarking aid: a forward of T rows (all sequences in it) takes at least A + B*(T-1) ms.
    The worker computes for real, then sleeps the rest, like a Mac-speed stage."""
    a_ms: float
    b_ms: float

    def seconds(self, rows: int) -> float:
        return (self.a_ms + self.b_ms * max(rows - 1, 0)) / 1e3

    @staticmethod
    def parse(text: str) -> "StageEmulation":
        """`A,B` in milliseconds."""
        try:
            a, b = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--emulate-ms takes A,B in milliseconds (e.g. 40,4), not {text!r}") from None
        if a < 0 or b < 0:
            raise ValueError("--emulate-ms values must be >= 0")
        return StageEmulation(a, b)


@dataclass(frozen=True)
class StageRun:
    """What one Forward got from this stage."""
    hidden: Activation
    positions: tuple[int, ...]
    compute_us: int
    batch_rows: int


class _Task:
    def __init__(self, fn: Callable | None = None, args: tuple = (), stage=None, call: ForwardCall | None = None,
                 on_done: Callable | None = None):
        self.fn, self.args, self.stage, self.call, self.on_done = fn, args, stage, call, on_done
        # Only a caller that waits needs an event; a ring frame's task hands its outcome on.
        self.done = threading.Event() if on_done is None else None
        self.finished = False
        self.result = None
        self.error: BaseException | None = None

    def finish(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.complete()

    def complete(self) -> None:
        """Wake the waiting caller, or (a ring frame) hand the outcome on from this thread."""
        self.finished = True
        if self.done is not None:
            self.done.set()
        if self.on_done is not None:
            try:
                self.on_done(self.result, self.error)
            except Exception:   # never let a sender's failure stop the MLX thread
                log.exception("passing a unit on failed")

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class ComputeLoop:
    """Runs every MLX operation of a worker on one thread, batching queued Forwards."""

    def __init__(self, max_batch_rows: int = 4096, emulate: StageEmulation | None = None):
        self.max_batch_rows, self.emulate = max_batch_rows, emulate
        self.tasks: deque[_Task] = deque()
        self.queued_end: dict[str, tuple[int, int]] = {}  # (end, epoch) queued Forwards leave each sequence at
        self.cond = threading.Condition()
        self.batches = 0           # merged forwards run
        self.merged = 0            # Forwards that ran in a batch with others
        self.inlets: list = []     # (inlet, on_frame) read by the MLX thread (mtpdist/wire/sockets.py Inlet)
        self.sleeping = False      # the MLX thread waits in select(): a new task writes to the pipe
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._run, name="mlx", daemon=True)
        self.thread.start()

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the MLX thread and return its result (or raise its error)."""
        return self._submit(_Task(fn, args))

    def forward(self, stage, call: ForwardCall) -> StageRun:
        """Run a Forward's rows on `stage`, possibly merged with other queued Forwards."""
        return self._submit(_Task(stage=stage, call=call))

    def forward_then(self, stage, call: ForwardCall, on_done: Callable) -> None:
        """Queue a Forward and return at once; `on_done(StageRun | None, error)` runs on the MLX
        thread after it. For ring frames: a link delivers them in order, so nothing waits here."""
        with self.cond:
            self._enqueue(_Task(stage=stage, call=call, on_done=on_done))

    def forward_in_order(self, stage, call: ForwardCall, wait: float) -> StageRun:
        """Like `forward`, but first hold the call (up to `wait` seconds) until the earlier chunks
        of its sequences have run or been queued here; after that it runs and, if still out of
        step, fails with the position it found."""
        end = time.monotonic() + wait
        task = _Task(stage=stage, call=call)
        with self.cond:
            while not all(self._ready(stage, s) for s in call.sequences):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            self._enqueue(task)
        return task.wait()

    def add_inlet(self, inlet, on_frame: Callable) -> None:
        """Read `inlet`'s frames on the MLX thread and call `on_frame(raw)` there; a RequestError
        from it (or the stream's end) ends the link: `inlet.done()`."""
        with self.cond:
            self.inlets.append((inlet, on_frame))
            self._wake()
            self.cond.notify_all()

    def _wake(self) -> None:
        if self.sleeping:
            try:
                os.write(self.wake_w, b"w")
            except BlockingIOError:
                pass            # the pipe is full: it will wake anyway

    def _poll(self, block: bool) -> None:
        """Take the frames waiting on the inlets (block: until a frame or a task comes)."""
        with self.cond:
            inlets = [i for i in self.inlets if not i[0].busy]
            if block and (self.tasks or not self.inlets):
                while not self.tasks and not self.inlets:
                    self.cond.wait()
                return
            self.sleeping = block
        woken = False
        try:
            ready = [i for i in inlets if i[0].pending()]
            if not ready:
                fds = [self.wake_r] + [i[0] for i in inlets] if block else [i[0] for i in inlets]
                got = set(select.select(fds, [], [], None if block else 0)[0]) if fds else set()
                woken = self.wake_r in got
                ready = [i for i in inlets if i[0] in got]
        finally:
            with self.cond:
                self.sleeping = False
        if woken:     # only then: an empty pipe's read raises, and raising costs ~0.3 ms cold here
            os.read(self.wake_r, 4096)
        budget = _DRAIN_MAX
        while ready and budget:
            i = ready.pop(0)
            if self._read_one(*i):
                budget -= 1
                if i[0].pending():
                    ready.append(i)      # more of it came with it: take it too, in turn with the others

    def _read_one(self, inlet, on_frame) -> bool:
        """One frame of `inlet` to `on_frame`; False once the link has ended here."""
        try:
            n = inlet.read_length()
            if n is not None and n > BIG_FRAME:
                inlet.busy = True
                threading.Thread(target=self._read_big, args=(inlet, on_frame, n), name="link-big",
                                 daemon=True).start()
                return False
            raw = None if n is None else inlet.read_body(n)
            if raw is not None:
                on_frame(raw)
                return True
        except RequestError as e:        # a frame this link must not carry: the link ends
            log.warning("closed a link: %s", e)
        except (OSError, ValueError):
            pass                         # the peer went away (or stopped mid-frame)
        except Exception:
            log.exception("a link's frame failed")
        self._drop(inlet)
        return False

    def _read_big(self, inlet, on_frame, n: int) -> None:
        try:
            raw = inlet.read_body(n)
            if raw is not None:
                on_frame(raw)
                with self.cond:
                    inlet.busy = False
                    self._wake()
                return
        except RequestError as e:
            log.warning("closed a link: %s", e)
        except (OSError, ValueError):
            pass
        except Exception:
            log.exception("a link's frame failed")
        self._drop(inlet)

    def _drop(self, inlet) -> None:
        with self.cond:
            self.inlets = [i for i in self.inlets if i[0] is not inlet]
        inlet.done()

    def _ready(self, stage, rows) -> bool:
        queued = self.queued_end.get(rows.sequence_id)   # (end, epoch) of its last queued rows
        return stage.ready(rows) or (queued is not None and (queued[1] != rows.epoch or queued[0] >= rows.position))

    def _enqueue(self, task: _Task) -> None:
        if task.call is not None:
            for s in task.call.sequences:
                self.queued_end[s.sequence_id] = (s.position + s.tokens, s.epoch)
        self.tasks.append(task)
        self.cond.notify_all()
        self._wake()

    def _submit(self, task: _Task):
        with self.cond:
            self._enqueue(task)
        return task.wait()

    def _take(self) -> list[_Task]:
        while True:
            with self.cond:
                idle, polled = not self.tasks, bool(self.inlets)
            if polled or idle:
                try:
                    self._poll(block=idle)
                except (OSError, ValueError) as e:   # a link closed under us: drop it, never this thread
                    log.warning("dropping a broken link: %s", e)
                    for inlet, _ in list(self.inlets):
                        if inlet.fileno() < 0:
                            self._drop(inlet)
            with self.cond:
                if self.tasks:
                    return self._batch()

    def _batch(self) -> list[_Task]:
        """The next task, with the Forwards queued after it that can run in the same batch."""
        batch = [self.tasks.popleft()]
        if batch[0].call is None:
            return batch
        ids = {s.sequence_id for s in batch[0].call.sequences}
        rows = batch[0].call.rows
        while self.tasks and self.tasks[0].call is not None and self.tasks[0].stage is batch[0].stage:
            nxt = self.tasks[0].call
            names = {s.sequence_id for s in nxt.sequences}
            if names & ids or rows + nxt.rows > self.max_batch_rows:
                break
            batch.append(self.tasks.popleft())
            ids |= names
            rows += nxt.rows
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                if batch[0].call is None:
                    t = batch[0]
                    try:
                        t.finish(t.fn(*t.args))
                    except BaseException as e:  # handed to the caller's thread
                        t.finish(error=e)
                else:
                    try:
                        self._forward(batch)
                    except BaseException as e:  # a compute error: every waiting caller hears of it
                        log.exception("forward failed")
                        for t in batch:
                            if not t.finished:
                                t.finish(error=t.error or e)
            finally:
                with self.cond:
                    for t in batch:
                        for s in (t.call.sequences if t.call is not None else ()):
                            if self.queued_end.get(s.sequence_id) == (s.position + s.tokens, s.epoch):
                                del self.queued_end[s.sequence_id]
                    self.cond.notify_all()  # wakes Forwards waiting for this work

    def _forward(self, batch: list[_Task]) -> None:
        from mtpdist.wire.activations import from_activation
        stage = batch[0].stage
        start = time.perf_counter()
        inputs = []
        for t in batch:
            try:
                x = from_activation(t.call.hidden, stage.hidden_size)
                stage.check(t.call.sequences, x.shape[0])
                inputs.append((t, x))
            except (RequestError, ValueError) as e:
                t.finish(error=e)
        rows = sum(t.call.rows for t, _ in inputs)
        if len(inputs) > 1:
            try:
                self._run_together(stage, inputs, rows)
                self.merged += len(inputs)
            except (RequestError, ValueError):
                # One of them is bad (nothing changed: the stage checks first); run each alone.
                for t, x in inputs:
                    self._run_together(stage, [(t, x)], t.call.rows)
        elif inputs:
            self._run_together(stage, inputs, rows)
        self.batches += 1
        if self.emulate is not None and inputs:
            left = self.emulate.seconds(rows) - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)
        for t, _ in inputs:
            t.complete()
        stage.tidy()        # after the outputs went on: their frames need not wait for it

    def _run_together(self, stage, inputs, rows: int) -> None:
        import mlx.core as mx
        from mtpdist.wire.activations import split_activation
        seqs = [s for t, _ in inputs for s in t.call.sequences]
        x = inputs[0][1] if len(inputs) == 1 else mx.concatenate([x for _, x in inputs], axis=0)
        try:
            out = stage.forward(seqs, x, checked=True)   # each task was checked as it was taken
        except (RequestError, ValueError) as e:
            if len(inputs) > 1:
                raise
            inputs[0][0].error = e
            return
        # Views of one evaluated buffer, not copies: each frame is encoded from its part at once
        acts = split_activation(out.hidden, out.bits, tuple(t.call.rows for t, _ in inputs))
        i = 0
        for (t, _), act in zip(inputs, acts):
            n = len(t.call.sequences)
            t.result = StageRun(act, tuple(out.positions[i:i + n]), out.compute_us, rows)
            i += n
