"""OpenAI request bodies as pydantic models, and the checks on what we can honour."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields we accept only at their "off" value; anything else gets a 400 that names them.
UNSUPPORTED = {
    "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "response_format": (None, {"type": "text"}), "audio": (None,),
    "prediction": (None,), "parallel_tool_calls": (None, False, True), "modalities": (None, ["text"]),
}


MAX_N = 8  # choices per request: each is a full generation (forked from one prefilled prompt)


class StreamOptions(BaseModel):
    """stream_options: whether the last streamed chunk carries usage."""
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # harmless unknown fields (user, metadata, store...) pass

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None)
    # allow_inf_nan=False: NaN fails every comparison, and was reported as out of range
    temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, lt=1, allow_inf_nan=False)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        for s in v or ():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a stop sequence is not valid Unicode text (it holds a lone surrogate)") from None
        return v

    def unsupported(self) -> list[str]:
        """Names of fields set to values we cannot honour."""
        return [k for k, ok in UNSUPPORTED.items() if k in (self.model_extra or {}) and self.model_extra[k] not in ok]

    def choices(self) -> int:
        """How many choices to generate (`n`)."""
        return self.n or 1

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class FunctionDef(BaseModel):
    """A function the model may call: name, description, JSON-schema parameters."""
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(BaseModel):
    """One entry of `tools` (only functions exist)."""
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    reasoning_content: Optional[str] = None

    def for_template(self) -> dict:
        """The message as a chat template expects it (text content, tool calls kept)."""
        return {"role": self.role, "content": self.text(), "tool_calls": self.tool_calls,
                "tool_call_id": self.tool_call_id, "name": self.name, "reasoning_content": self.reasoning_content}

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text":
                    raise ValueError(f"message content of type {p.get('type')!r} is not supported (text only)")
                parts.append(str(p.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    """The body of POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)

    def want_logprobs(self) -> int | None:
        """Top alternatives per token to report (0: the chosen token only); None: no logprobs."""
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    """The body of POST /v1/completions."""
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)

    def want_logprobs(self) -> int | None:
        """Top alternatives per token to report (0: the chosen token only); None: no logprobs."""
        return self.logprobs

    def limit(self) -> Optional[int]:
        return self.max_tokens
