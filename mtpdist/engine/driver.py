"""Driving the scheduler from the calling thread: `mtpdist generate`, `bench` and tests run
requests through the same scheduler the server runs (one sequence is a batch of one)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..errors import MtpdistError
from .generate import Delta, GenerationRequest, GenerationResult
from .scheduler import Scheduler


class CollectingSink:
    """A Sink that keeps everything; `wait()` returns the result. `on_delta` sees each Delta."""

    def __init__(self, on_delta: Callable[[Delta], None] | None = None) -> None:
        self.deltas: list[Delta] = []
        self.error: Exception | None = None
        self.result: GenerationResult | None = None
        self.first_token_at: float | None = None
        self.created = time.perf_counter()
        self.ended = threading.Event()
        self.cancel = threading.Event()
        self.on_delta = on_delta

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
            if self.on_delta is not None:
                self.on_delta(item)

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self.ended.wait(timeout):
            raise MtpdistError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


def run_all(scheduler: Scheduler, requests: list[GenerationRequest], timeout: float = 300.0,
            stagger: float = 0.0, on_delta: Callable[[Delta], None] | None = None) -> list[CollectingSink]:
    """Insert every request (optionally `stagger` seconds apart) and drive the scheduler on this
    thread until all have ended and what they left (kept states) is settled. The caller's
    thread must be the one that owns MLX."""
    sinks: list[CollectingSink] = []
    end = time.monotonic() + timeout
    next_at = time.monotonic()
    while len(sinks) < len(requests) or not all(s.ended.is_set() for s in sinks) or not scheduler.settled:
        if len(sinks) < len(requests) and time.monotonic() >= next_at:
            sink = CollectingSink(on_delta)
            scheduler.insert(requests[len(sinks)], sink)
            sinks.append(sink)
            next_at = time.monotonic() + stagger
            continue
        if time.monotonic() > end:
            raise MtpdistError(f"requests did not finish within {timeout:.0f}s")
        scheduler.run_once(0.002 if stagger else 0.02)
    return sinks


def generate(scheduler: Scheduler, request: GenerationRequest, timeout: float = 3600.0,
             on_delta: Callable[[Delta], None] | None = None) -> GenerationResult:
    """One request through the scheduler, to its result (raises its error)."""
    return run_all(scheduler, [request], timeout, on_delta=on_delta)[0].wait(0)
