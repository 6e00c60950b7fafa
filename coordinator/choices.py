"""`n` choices of one request: n generations, the prompt prefilled once.

The first choice is queued alone; the others are queued when it sends its first event. By
then its prompt is prefilled and the scheduler has kept the end-of-prompt state (prompts
of at least `prefix_min_tokens`, with prefix reuse on), so the others fork from that state
on the workers and start decoding at once instead of prefilling the prompt again (the
response's `cached_tokens_by_choice` shows it; `usage` counts the prompt once, as OpenAI does).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import Request

from mtpdist.engine.generate import GenerationRequest, GenerationResult

from .engine_thread import Job

DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


def expand(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """n requests; with a seed, choice i samples with seed + i (else all n would be one sequence)."""
    seed = req.sampling.seed
    if seed is None:
        return [req] * n
    return [replace(req, sampling=replace(req.sampling, seed=(seed + i) % (1 << 64))) for i in range(n)]


class ChoiceJobs:
    """The jobs of one request's choices; `start` queues the first, `events` the others when due."""

    def __init__(self, state, reqs: list[GenerationRequest]):
        self.state = state
        loop = asyncio.get_running_loop()
        self.jobs = [Job(r, loop) for r in reqs]
        self.queued = 0

    def _queue(self, upto: int) -> None:
        for job in self.jobs[self.queued:upto]:
            self.state.engine.submit(job)
        self.queued = max(self.queued, upto)

    def start(self) -> None:
        self._queue(1)

    def cancel(self) -> None:
        """Stop every choice still running (client gone, error, or done)."""
        for job in self.jobs:
            job.cancelled.set()

    async def events(self, request: Request | None = None):
        """(choice index, event) as they come; raises ClientGone when `request`'s client leaves.

        The connection is checked every DISCONNECT_POLL_S whether or not events keep coming."""
        loop = asyncio.get_running_loop()
        getters: dict[int, asyncio.Future] = {}
        live, checked = {0}, loop.time()
        try:
            while live:
                for i in sorted(live):
                    if i not in getters:
                        getters[i] = asyncio.ensure_future(self.jobs[i].events.get())
                await asyncio.wait(set(getters.values()), timeout=DISCONNECT_POLL_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if request is not None and loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        raise ClientGone
                for i in sorted(getters):
                    if not getters[i].done():
                        continue
                    item = getters.pop(i).result()
                    if i == 0 and self.queued < len(self.jobs):  # the prompt is in: fork the others
                        self._queue(len(self.jobs))
                        live.update(range(1, len(self.jobs)))
                    if item is None:
                        live.discard(i)
                    else:
                        yield i, item
        finally:
            for g in getters.values():
                g.cancel()


def usage(results: list[GenerationResult]) -> dict:
    """OpenAI's usage of n choices: the prompt once, every choice's completion tokens."""
    first = results[0]
    completion = sum(r.generation_tokens for r in results)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


def mtp_stats(results: list[GenerationResult], on: bool) -> dict:
    """The MTP statistics of all choices together (generation_tps: their summed rates)."""
    drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
    depth = max((len(r.rounds_by_depth) for r in results), default=0)
    rounds = [[sum(r.rounds_by_depth[j][k] for r in results if j < len(r.rounds_by_depth)) for k in (0, 1)]
              for j in range(depth)]
    by_depth = [round(h / t, 4) if t else 0.0 for t, h in rounds] if len(results) > 1 else \
        list(results[0].acceptance_by_depth)
    return {"enabled": on, "drafted": drafted, "accepted": accepted,
            "acceptance": round(accepted / drafted, 4) if drafted else 0.0,
            "verify_passes": sum(r.verify_passes for r in results), "acceptance_by_depth": by_depth,
            "generation_tps": round(sum(r.generation_tps for r in results), 3)}
