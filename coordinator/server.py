"""The OpenAI-compatible HTTP API (FastAPI). Handlers validate and queue; MLX runs elsewhere.

Nothing slow runs on the event loop: chat templates and tokenization run on a worker
thread, generation on the engine, so /health answers while a 10 MB prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtpdist import __version__
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.sampling import SamplingParams

from .api_errors import APIError
from .api_models import ChatCompletionRequest, CompletionRequest
from .chat import ChatRequestError, chat_spec, render
from .metrics import Metrics
from .responses import ChatContext, check_queue, complete

# Below this a temperature divides logits into overflow; such requests mean "greedy".
MIN_TEMPERATURE = 1e-5


@dataclass
class ServerState:
    """What the HTTP handlers share: the engine, tokenizer, limits, metrics."""
    engine: object                    # has submit(job) and a `depth` property
    tokenizer: object
    model_name: str                   # the id /v1/models lists and responses carry
    max_context: int
    mtp: bool
    metrics: Metrics
    vocab_size: int = 0
    api_key: str | None = None
    cluster_info: Callable[[], dict] = dict
    default_max_tokens: int = 512
    mtp_depth: int | str = 1
    max_queue: int = 64               # requests waiting or running; beyond it: 429
    retry_after: int = 1              # seconds, the Retry-After of a 429
    model_aliases: tuple[str, ...] = ()  # other names a request's `model` may give (the folder's name)
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tokenize"))


def _http_error(e: StarletteHTTPException, path: str) -> APIError:
    if e.status_code == 404:
        return APIError(404, f"no such endpoint: {path}", code="not_found")
    if e.status_code == 405:
        return APIError(405, f"method not allowed on {path}", code="method_not_allowed")
    if e.status_code == 400:  # the body could not be parsed: not UTF-8, or nested too deep for the parser
        return APIError(400, "request body is not valid JSON (it must be UTF-8 JSON, nested at most a few "
                             "hundred levels)", code="json_invalid")
    return APIError(e.status_code, str(e.detail), code=None)


class _Auth:
    """Bearer-key check on /v1/*, as plain ASGI: it passes `receive` through untouched, so
    handlers can still see a client's disconnect (a BaseHTTPMiddleware would hide it)."""
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.api_key and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, f"Bearer {self.state.api_key}".encode()):
                e = APIError(401, "invalid or missing API key", code="invalid_api_key", kind="authentication_error")
                self.state.metrics.count(scope["path"], 401)
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application of the OpenAI-compatible API."""
    app = FastAPI(title="mtpdist", version=__version__,
                  description="OpenAI-compatible API over a pipeline of Macs, with MTP speculative decoding")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.count(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "request body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{loc or 'body'}: {first.get('msg', 'invalid value')}"
        param = None if first.get("type") == "json_invalid" else loc
        return await _api_error(request, APIError(400, msg, param, first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return await _api_error(request, _http_error(e, request.url.path))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # a bug of ours: still OpenAI's shape, never a traceback
        return await _api_error(request, APIError(500, f"internal error: {type(e).__name__}", code="internal_error",
                                                  kind="server_error"))

    app.add_middleware(_Auth, state=state)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "queue_depth": state.engine.load}

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.engine.load)
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
        check_model(state, body.model)
        check_queue(state)
        try:
            messages = [m.for_template() for m in body.messages]
            spec = chat_spec(messages, [t.model_dump(exclude_none=True) for t in body.tools or []] or None,
                             body.tool_choice, body.response_format, body.chat_template_kwargs)
            prompt = await _off_loop(state, render, state.tokenizer, spec)
        except ChatRequestError as e:
            raise APIError(400, str(e), e.param) from None
        except ValueError as e:  # a content part we cannot take
            raise APIError(400, str(e), "messages") from None
        ctx = ChatContext(prompt.in_reasoning, spec.tool_schemas(), spec.response_format,
                          max_calls=1 if body.parallel_tool_calls is False else None)
        req = replace(_request(state, body, prompt.ids, body.limit()), boundaries=prompt.boundaries)
        return await complete(state, req, body, request, ctx)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(state, body.model)
        check_queue(state)
        ids = await _off_loop(state, _encode, state, body.prompt)
        return await complete(state, _request(state, body, ids, body.limit()), body, request, None)

    return app


async def _off_loop(state: ServerState, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, fn, *args)


def _encode(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "prompt is not valid Unicode text (it holds a lone surrogate)", "prompt") from None
        return state.tokenizer.encode(prompt)
    if any(not 0 <= t < state.vocab_size for t in prompt):
        raise APIError(400, "prompt holds token ids outside the vocabulary", "prompt")
    return list(prompt)


def _seed(seed: int | None) -> int | None:
    """OpenAI takes any integer; -1 conventionally means "random", others are folded into 64 bits."""
    if seed is None or seed == -1:
        return None
    return seed % (1 << 64)


def check_model(state: ServerState, name: str | None) -> None:
    """OpenAI's 404 for a model this server does not serve (no `model` at all is taken as ours)."""
    if name is None or name == state.model_name or name in state.model_aliases:
        return
    raise APIError(404, f"The model {name!r} does not exist on this server; it serves {state.model_name!r} "
                        "(see /v1/models)", "model", "model_not_found")


def _request(state: ServerState, body, ids, limit: int | None) -> GenerationRequest:
    bad = body.unsupported()
    if bad:
        raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}", bad[0], "unsupported_parameter")
    try:
        logprobs = body.want_logprobs()
    except ValueError as e:
        raise APIError(400, str(e), "top_logprobs") from None
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
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    sampling = SamplingParams(temperature=temperature, top_p=body.top_p or 1.0, top_k=body.top_k or 0,
                              min_p=body.min_p or 0.0, seed=_seed(body.seed))
    return GenerationRequest(tuple(ids), limit, sampling, body.stops(), mtp=state.mtp, mtp_depth=state.mtp_depth,
                             logprobs=logprobs)
