"""The one thread that runs MLX for the HTTP server: requests queue here and run in turn.

Handlers submit a Job and read its events from an asyncio queue; setting `cancelled`
(a client that went away) stops the generation and releases the sequence on every worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from mtpdist.engine.generate import GenerationRequest, Generator
from mtpdist.errors import MtpdistError

log = logging.getLogger("mtpdist.coordinator")


@dataclass
class Job:
    """One queued generation and the queue its events go to."""
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineThread(threading.Thread):
    """Runs jobs one at a time. `prepare` (re-plan on membership change) runs before each."""

    def __init__(self, generator: Generator, make_trunk: Callable, prepare: Callable[[], None] = lambda: None,
                 on_done: Callable = lambda job, result, trunk: None):
        super().__init__(name="mlx-engine", daemon=True)
        self.generator, self.make_trunk, self.prepare, self.on_done = generator, make_trunk, prepare, on_done
        self.jobs: queue.Queue = queue.Queue()
        self.busy = False

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + (1 if self.busy else 0)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        trunk = None
        try:
            self.prepare()
            trunk = self.make_trunk()
            stream = self.generator.stream(job.request, trunk)
            try:
                for delta in stream:
                    if job.cancelled.is_set():
                        log.info("client went away; stopping its generation")
                        break
                    job.emit(delta)
                    if delta.result is not None:
                        self.on_done(job, delta.result, trunk)
            finally:
                stream.close()  # releases the sequence on every worker
        except MtpdistError as e:
            log.error("generation failed: %s", e)
            job.emit(e)
        except Exception as e:  # never let one request take the engine down
            log.exception("generation failed")
            job.emit(MtpdistError(f"internal error: {e}"))
        finally:
            job.emit(None)
