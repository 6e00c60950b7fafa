"""Run one queued generation and answer it: a JSON body or a server-sent event stream.

A client that goes away stops its generation: a stream notices when its next write
fails; a non-streaming request polls the connection while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mtpdist.engine.generate import GenerationRequest, GenerationResult
from mtpdist.errors import MtpdistError

from .api_errors import APIError
from .chat import check_json_reply
from .chat_output import ChatOutputParser, OutputDelta, parse_reply
from .engine_thread import Job

DISCONNECT_POLL_S = 0.25
CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never seen by the client


@dataclass(frozen=True)
class ChatContext:
    """How to read a chat reply: opened inside <think>?, the declared tools, a JSON format to check."""
    in_reasoning: bool = False
    tools: dict | None = None
    response_format: dict | None = None
    max_calls: int | None = None      # 1 when parallel_tool_calls is false


class _ClientGone(Exception):
    pass


def _usage(r: GenerationResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}


def _mtp(r: GenerationResult, on: bool) -> dict:
    return {"enabled": on, "drafted": r.drafted, "accepted": r.accepted, "acceptance": round(r.acceptance, 4),
            "verify_passes": r.verify_passes, "acceptance_by_depth": list(r.acceptance_by_depth),
            "generation_tps": round(r.generation_tps, 3)}


def _failed(item: MtpdistError) -> APIError:
    return APIError(503, f"generation failed: {item}", code="cluster_unavailable", kind="server_error")


async def _events(job: Job, request: Request):
    """The job's events; raises _ClientGone when the client's connection closes first.

    The connection is checked every DISCONNECT_POLL_S whether or not events keep coming
    (a running generation sends them every few milliseconds)."""
    loop = asyncio.get_running_loop()
    getter, checked = None, loop.time()
    try:
        while True:
            getter = getter or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if loop.time() - checked >= DISCONNECT_POLL_S:
                checked = loop.time()
                if await request.is_disconnected():
                    raise _ClientGone
            if not done:
                continue
            item, getter = getter.result(), None
            if item is None:
                return
            yield item
    finally:
        if getter is not None:
            getter.cancel()


def check_queue(state) -> None:
    """429 with Retry-After when `max_queue` requests are already waiting or running."""
    if state.engine.load >= state.max_queue:
        raise APIError(429, f"the server has {state.engine.load} requests queued or running (its limit); "
                            "retry shortly", code="queue_full", kind="rate_limit_error",
                       headers={"Retry-After": str(state.retry_after)})


async def complete(state, req: GenerationRequest, body, request: Request, chat: ChatContext | None):
    """Queue `req` on the engine and answer the client (streaming or not)."""
    endpoint = request.url.path
    check_queue(state)  # again: others may have queued while this prompt was tokenized (no await until submit)
    job = Job(req, asyncio.get_running_loop())
    state.engine.submit(job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    base = {"id": rid, "created": int(time.time()), "model": state.model_name}
    t0 = time.perf_counter()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, job, request, base, chat, include_usage, t0),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, result = [], None
    try:
        async for item in _events(job, request):
            if isinstance(item, MtpdistError):
                raise _failed(item)
            text.append(item.text)
            result = item.result or result
    except _ClientGone:
        state.metrics.count(endpoint, CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)
    finally:
        job.cancelled.set()  # stops the generation if it still runs (client gone, error)
    state.metrics.count(endpoint, 200)
    state.metrics.observe(endpoint, time.perf_counter() - t0)
    content = "".join(text)
    tail = {"usage": _usage(result), "mtp": _mtp(result, state.mtp)}
    if chat is None:
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": result.finish_reason}
        return {**base, "object": "text_completion", "choices": [choice], **tail}
    out = parse_reply(content, chat.in_reasoning, chat.tools, chat.max_calls)
    message = {"role": "assistant", "content": out.content if out.content or not out.tool_calls else None}
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    if out.tool_calls:
        message["tool_calls"] = [c.as_dict() for c in out.tool_calls]
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": _finish(result.finish_reason, bool(out.tool_calls))}
    if chat.response_format:
        tail["response_format"] = check_json_reply(out.content, chat.response_format)
    return {**base, "object": "chat.completion", "choices": [choice], **tail}


def _finish(reason: str, called: bool) -> str:
    return "tool_calls" if called and reason == "stop" else reason


def _delta_chunks(d: OutputDelta, calls_so_far: int) -> list[dict]:
    out = []
    if d.reasoning:
        out.append({"reasoning_content": d.reasoning})
    if d.content:
        out.append({"content": d.content})
    if d.tool_calls:
        out.append({"tool_calls": [c.as_dict(calls_so_far + i) for i, c in enumerate(d.tool_calls)]})
    return out


async def _sse(state, job: Job, request: Request, base: dict, chat: ChatContext | None, include_usage: bool,
               t0: float):
    obj = "chat.completion.chunk" if chat else "text_completion"
    parser = ChatOutputParser(chat.in_reasoning, chat.tools, chat.max_calls) if chat else None
    content, calls = [], 0

    def chunk(payload: dict | str | None, finish: str | None = None, **extra) -> str:
        if chat:
            c = {"index": 0, "delta": payload or {}, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": payload or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'object': obj, 'choices': [c], **extra})}\n\n"

    def chat_chunks(d: OutputDelta) -> list[str]:
        nonlocal calls
        content.append(d.content)
        parts = [chunk(p) for p in _delta_chunks(d, calls)]
        calls += len(d.tool_calls)
        return parts

    status = "200"
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while (item := await job.events.get()) is not None:
            if isinstance(item, MtpdistError):
                status = "503"
                yield f"data: {json.dumps(_failed(item).body())}\n\n"
                continue
            if item.text:
                for part in chat_chunks(parser.feed(item.text)) if chat else [chunk(item.text)]:
                    yield part
            if item.result is None:
                continue
            extra = {}
            if chat:
                for part in chat_chunks(parser.finish()):
                    yield part
                if chat.response_format:
                    extra["response_format"] = check_json_reply("".join(content), chat.response_format)
            yield chunk(None, _finish(item.result.finish_reason, calls > 0), **extra)
            if include_usage:
                usage = {"usage": _usage(item.result), "mtp": _mtp(item.result, state.mtp)}
                yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], **usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its generation; its worker state is released
        state.metrics.count(request.url.path, status)
        state.metrics.observe(request.url.path, time.perf_counter() - t0)
