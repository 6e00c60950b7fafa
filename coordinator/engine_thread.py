"""The one thread that runs MLX for the HTTP server: it drives the scheduler, which keeps
many requests' steps in flight through the pipeline.

Handlers submit a Job and read its events from an asyncio queue; setting `cancelled`
(a client that went away) stops the generation and releases the sequence on every worker.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Callable

from mtpdist.engine.generate import GenerationRequest, GenerationResult, Generator
from mtpdist.engine.scheduler import Backend, Scheduler, SchedulerSettings


@dataclass
class Job:
    """One generation request and the queue its events go to."""
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _JobSink:
    def __init__(self, job: Job):
        self.job = job

    def emit(self, item) -> None:
        self.job.emit(item)

    def cancelled(self) -> bool:
        return self.job.cancelled.is_set()


class EngineThread(threading.Thread):
    """Owns MLX; runs the scheduler until stopped."""

    def __init__(self, generator: Generator, backend: Backend, settings: SchedulerSettings = SchedulerSettings(),
                 on_result: Callable[[GenerationResult], None] = lambda r: None,
                 on_unit: Callable = lambda wall, r: None):
        super().__init__(name="mlx-engine", daemon=True)
        self.scheduler = Scheduler(generator, backend, settings, on_result, on_unit)
        self._stop = threading.Event()

    @property
    def load(self) -> int:
        """Requests queued or running."""
        return self.scheduler.load

    def submit(self, job: Job) -> None:
        self.scheduler.insert(job.request, _JobSink(job))

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); the engine notices within one loop turn."""
        job.cancelled.set()
        self.scheduler.wake()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake()

    def run(self) -> None:
        self.scheduler.run(self._stop)
