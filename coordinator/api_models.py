"""OpenAI request bodies as pydantic models, and the checks on what we can honour."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields we accept only at their "off" value; anything else gets a 400 that names them.
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "response_format": (None, {"type": "text"}), "audio": (None,),
    "prediction": (None,), "parallel_tool_calls": (None, False, True), "modalities": (None, ["text"]),
}


class StreamOptions(BaseModel):
    """stream_options: whether the last streamed chunk carries usage."""
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # harmless unknown fields (user, metadata, store...) pass

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, lt=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def unsupported(self) -> list[str]:
        """Names of fields set to values we cannot honour."""
        bad = [k for k, ok in UNSUPPORTED.items() if k in (self.model_extra or {}) and self.model_extra[k] not in ok]
        if self.n not in (None, 1):
            bad.append("n")
        return bad

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

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    """The body of POST /v1/completions."""
    prompt: Union[str, list[int]]

    def limit(self) -> Optional[int]:
        return self.max_tokens
