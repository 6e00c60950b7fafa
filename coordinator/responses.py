"""Run a request's queued generations (one per choice) and answer: a JSON body or a server-sent
event stream.

A client that goes away stops its generations: a stream notices when its next write
fails (counted as 499 in /metrics); a non-streaming request polls the connection while it waits.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mtpdist.engine.generate import GenerationRequest, GenerationResult
from mtpdist.errors import MtpdistError

from .api_errors import APIError
from .api_logprobs import TokenText, chat_logprobs, completion_logprobs
from .chat import check_json_reply
from .chat_output import ChatOutputParser, OutputDelta, parse_reply
from .choices import ChoiceJobs, ClientGone, expand, mtp_stats, usage

CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never seen by the client


@dataclass(frozen=True)
class ChatContext:
    """How to read a chat reply: opened inside <think>?, the declared tools, a JSON format to check."""
    in_reasoning: bool = False
    tools: dict | None = None
    response_format: dict | None = None
    max_calls: int | None = None      # 1 when parallel_tool_calls is false


def _failed(item: MtpdistError) -> APIError:
    return APIError(503, f"generation failed: {item}", code="cluster_unavailable", kind="server_error")


def check_queue(state, adding: int = 1) -> None:
    """429 with Retry-After when `max_queue` requests are already waiting or running, or when
    `adding` more (a request's n choices) would pass it while others wait (alone, any n runs)."""
    depth = state.engine.load
    if depth >= state.max_queue or (depth and depth + adding > state.max_queue):
        raise APIError(429, f"the server has {depth} requests queued or running and takes {state.max_queue}; "
                            "retry shortly", code="queue_full", kind="rate_limit_error",
                       headers={"Retry-After": str(state.retry_after)})


async def complete(state, req: GenerationRequest, body, request: Request, chat: ChatContext | None):
    """Queue `req` (n times for n choices) on the engine and answer the client (streaming or not)."""
    endpoint = request.url.path
    check_queue(state, body.choices())  # again: others may have queued while this prompt was tokenized
    jobs = ChoiceJobs(state, expand(req, body.choices()))
    jobs.start()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    base = {"id": rid, "created": int(time.time()), "model": state.model_name}
    t0 = time.perf_counter()
    text = TokenText(state.tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, jobs, request, base, chat, include_usage, t0, text),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    n = len(jobs.jobs)
    texts, lps, results = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
    try:
        async for i, item in jobs.events(request):
            if isinstance(item, MtpdistError):
                raise _failed(item)
            texts[i].append(item.text)
            lps[i].extend(item.logprobs or ())
            results[i] = item.result or results[i]
    except ClientGone:
        state.metrics.count(endpoint, CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)
    finally:
        jobs.cancel()  # stops the generations that still run (client gone, error)
    state.metrics.count(endpoint, 200)
    state.metrics.observe(endpoint, time.perf_counter() - t0)
    tail = {"usage": usage(results), "mtp": mtp_stats(results, state.mtp)}
    if n > 1:
        tail["cached_tokens_by_choice"] = [r.cached_tokens for r in results]
    want = req.logprobs is not None
    if chat is None:
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": completion_logprobs(lps[i], text) if want else None,
                    "finish_reason": results[i].finish_reason} for i in range(n)]
        return {**base, "object": "text_completion", "choices": choices, **tail}
    choices = []
    for i in range(n):
        out = parse_reply("".join(texts[i]), chat.in_reasoning, chat.tools, chat.max_calls)
        message = {"role": "assistant", "content": out.content if out.content or not out.tool_calls else None}
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        if out.tool_calls:
            message["tool_calls"] = [c.as_dict() for c in out.tool_calls]
        choice = {"index": i, "message": message, "logprobs": chat_logprobs(lps[i], text) if want else None,
                  "finish_reason": _finish(results[i].finish_reason, bool(out.tool_calls))}
        if chat.response_format:  # per choice (OpenAI has no such field; n = 1 keeps the top-level one)
            check = check_json_reply(out.content, chat.response_format)
            choice["response_format"] = check
            tail.setdefault("response_format", check)
        choices.append(choice)
    return {**base, "object": "chat.completion", "choices": choices, **tail}


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


class _Choice:
    """One choice's state while it streams."""
    def __init__(self, chat: ChatContext | None):
        self.parser = ChatOutputParser(chat.in_reasoning, chat.tools, chat.max_calls) if chat else None
        self.content: list[str] = []
        self.calls = 0
        self.sent = 0          # completion characters sent (logprobs' text_offset)
        self.result: GenerationResult | None = None


async def _sse(state, jobs: ChoiceJobs, request: Request, base: dict, chat: ChatContext | None,
               include_usage: bool, t0: float, text: TokenText):
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = len(jobs.jobs)
    choices = [_Choice(chat) for _ in range(n)]
    want = jobs.jobs[0].request.logprobs is not None

    def chunk(i: int, payload: dict | str | None, finish: str | None = None, logprobs=None, **extra) -> str:
        if chat:
            c = {"index": i, "delta": payload or {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": i, "text": payload or "", "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'object': obj, 'choices': [c], **extra})}\n\n"

    def chat_chunks(i: int, d: OutputDelta, lps) -> list[str]:
        ch = choices[i]
        ch.content.append(d.content)
        parts = _delta_chunks(d, ch.calls)
        ch.calls += len(d.tool_calls)
        if lps:  # the tokens' logprobs ride on the first piece they produced (or an empty delta)
            parts = parts or [{}]
            return [chunk(i, p, logprobs=chat_logprobs(lps, text) if k == 0 else None) for k, p in enumerate(parts)]
        return [chunk(i, p) for p in parts]

    def text_chunk(i: int, piece: str, lps) -> str:
        ch = choices[i]
        lp = completion_logprobs(lps, text, ch.sent) if lps else None
        ch.sent += sum(len(t) for t in (lp or {}).get("tokens", ()))
        return chunk(i, piece, logprobs=lp)

    status, completed = "200", False
    try:
        if chat:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
        async for i, item in jobs.events():
            if isinstance(item, MtpdistError):
                status = "503"
                yield f"data: {json.dumps(_failed(item).body())}\n\n"
                continue
            lps = item.logprobs if want else None
            if item.text or lps:
                for part in chat_chunks(i, choices[i].parser.feed(item.text), lps) if chat else \
                        [text_chunk(i, item.text, lps)]:
                    yield part
            if item.result is None:
                continue
            choices[i].result = item.result
            extra = {}
            if chat:
                for part in chat_chunks(i, choices[i].parser.finish(), None):
                    yield part
                if chat.response_format:
                    extra["response_format"] = check_json_reply("".join(choices[i].content), chat.response_format)
            yield chunk(i, None, _finish(item.result.finish_reason, choices[i].calls > 0), **extra)
        results = [c.result for c in choices]
        if include_usage and all(results):
            tail = {"usage": usage(results), "mtp": mtp_stats(results, state.mtp)}
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], **tail})}\n\n"
        yield "data: [DONE]\n\n"
        completed = True
    finally:
        jobs.cancel()  # a client that left stops its generations; their worker state is released
        if not completed and status == "200":
            status = str(CLIENT_GONE)  # the stream was cut before its end: the client hung up
        state.metrics.count(request.url.path, status)
        state.metrics.observe(request.url.path, time.perf_counter() - t0)
