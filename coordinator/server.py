"""The OpenAI-compatible HTTP API (FastAPI). Handlers validate and queue; MLX runs elsewhere."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mtpdist import __version__
from mtpdist.engine.generate import GenerationRequest, GenerationResult
from mtpdist.engine.sampling import SamplingParams
from mtpdist.errors import MtpdistError

from .api_models import ChatCompletionRequest, CompletionRequest
from .engine_thread import EngineThread, Job
from .metrics import Metrics


class APIError(Exception):
    """An error answered as an OpenAI-style JSON object with an HTTP status."""
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServerState:
    """What the HTTP handlers share: the engine thread, tokenizer, limits, metrics."""
    engine: EngineThread
    tokenizer: object
    model_name: str
    max_context: int
    mtp: bool
    metrics: Metrics
    vocab_size: int = 0
    api_key: str | None = None
    cluster_info: Callable[[], dict] = dict
    default_max_tokens: int = 512
    mtp_depth: int | str = 1


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application of the OpenAI-compatible API."""
    app = FastAPI(title="mtpdist", version=__version__,
                  description="OpenAI-compatible API over a pipeline of Macs, with MTP speculative decoding")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "request body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{loc or 'body'}: {first.get('msg', 'invalid value')}"
        param = None if first.get("type") == "json_invalid" else loc
        return await _api_error(request, APIError(400, msg, param, first.get("type")))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
                e = APIError(401, "invalid or missing API key", code="invalid_api_key", kind="authentication_error")
                state.metrics.requests.labels(request.url.path, "401").inc()
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "queue_depth": state.engine.depth}

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.engine.depth)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "mtpdist"}]}

    @app.get("/v1/cluster")
    def cluster():  # plain def: FastAPI runs it in its threadpool, never behind a generation
        return state.cluster_info()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        try:
            ids = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        return await _complete(state, body, list(ids), body.limit(), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            ids = state.tokenizer.encode(body.prompt)
        else:
            ids = body.prompt
            if any(not 0 <= t < state.vocab_size for t in ids):
                raise APIError(400, "prompt holds token ids outside the vocabulary", "prompt")
        return await _complete(state, body, list(ids), body.limit(), request, chat=False)

    return app


def _request(state: ServerState, body, ids: list[int], limit: int | None) -> GenerationRequest:
    bad = body.unsupported()
    if bad:
        raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}", bad[0], "unsupported_parameter")
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    room = state.max_context - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {state.max_context}",
                       "messages", "context_length_exceeded")
    if limit is None:
        limit = min(state.default_max_tokens, room)
    if limit < 1:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens")
    if limit > room:
        raise APIError(400, f"max_tokens {limit} exceeds the {room} tokens left in the context "
                            f"({state.max_context} - {len(ids)} prompt tokens)", "max_tokens",
                       "context_length_exceeded")
    sampling = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p or 1.0, top_k=body.top_k or 0, min_p=body.min_p or 0.0, seed=body.seed)
    return GenerationRequest(tuple(ids), limit, sampling, body.stops(), mtp=state.mtp, mtp_depth=state.mtp_depth)


def _usage(r: GenerationResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}


def _mtp(r: GenerationResult, on: bool) -> dict:
    return {"enabled": on, "drafted": r.drafted, "accepted": r.accepted, "acceptance": round(r.acceptance, 4),
            "verify_passes": r.verify_passes, "acceptance_by_depth": list(r.acceptance_by_depth),
            "generation_tps": round(r.generation_tps, 3)}


async def _complete(state: ServerState, body, ids, limit, request: Request, chat: bool):
    import asyncio
    endpoint = request.url.path
    req = _request(state, body, ids, limit)
    job = Job(req, asyncio.get_running_loop())
    state.engine.submit(job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    base = {"id": rid, "created": created, "model": state.model_name}
    t0 = time.perf_counter()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, job, base, chat, include_usage, endpoint, t0),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, result = [], None
    try:
        while (item := await job.events.get()) is not None:
            if isinstance(item, MtpdistError):
                raise APIError(503, f"generation failed: {item}", code="cluster_unavailable", kind="server_error")
            text.append(item.text)
            result = item.result or result
    finally:
        job.cancelled.set()
    state.metrics.requests.labels(endpoint, "200").inc()
    state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)
    content = "".join(text)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                  "finish_reason": result.finish_reason}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(result),
                "mtp": _mtp(result, state.mtp)}
    choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": result.finish_reason}
    return {**base, "object": "text_completion", "choices": [choice], "usage": _usage(result),
            "mtp": _mtp(result, state.mtp)}


async def _sse(state, job: Job, base: dict, chat: bool, include_usage: bool, endpoint: str, t0: float):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(content: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": content or ""} if first else \
                ({"content": content} if content else {})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'object': obj, 'choices': [c]})}\n\n"

    status = "200"
    try:
        if chat:
            yield chunk("", None, first=True)
        while (item := await job.events.get()) is not None:
            if isinstance(item, MtpdistError):
                status = "503"
                err = APIError(503, f"generation failed: {item}", code="cluster_unavailable", kind="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                continue
            if item.text:
                yield chunk(item.text, None)
            if item.result is not None:
                yield chunk(None, item.result.finish_reason)
                if include_usage:
                    extra = {"usage": _usage(item.result), "mtp": _mtp(item.result, state.mtp)}
                    yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], **extra})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its generation; its worker state is released
        state.metrics.requests.labels(endpoint, status).inc()
        state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)
