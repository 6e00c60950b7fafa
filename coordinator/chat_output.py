"""Split a Qwen3.5 reply, as it streams, into reasoning, content and tool calls.

Qwen3.5 thinks inside `<think>...</think>` (with thinking on, its chat template already
opened the block in the prompt, so the reply starts inside it) and calls tools as

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Older Qwen models put a JSON object (`{"name": ..., "arguments": {...}}`) between the same
tags; both are understood. Text is fed in arbitrary pieces (a tag may be split across
pieces), so the parser holds back anything that could still turn out to be a tag.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK, END_THINK, CALL, END_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call, in OpenAI's terms: `arguments` is a JSON string."""
    id: str
    name: str
    arguments: str

    def as_dict(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


@dataclass
class OutputDelta:
    """What one piece of generated text added: reasoning, content and finished tool calls."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def add(self, other: "OutputDelta") -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def _held(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def _typed(value: str, schema: dict | None):
    """A parameter's text as the type its JSON schema declares (text stays text when unsure)."""
    kind = (schema or {}).get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if kinds == ["string"] or kind is None:
        return value
    try:
        return json.loads(value)
    except ValueError:
        if "boolean" in kinds and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value


def parse_tool_call(body: str, tools: dict[str, dict] | None = None) -> tuple[str, dict] | None:
    """(name, arguments) from the text between `<tool_call>` tags, or None if it is neither format."""
    body = body.strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        name = obj.get("name") if isinstance(obj, dict) else None
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        return (name, args) if isinstance(name, str) and isinstance(args, dict) else None
    m = _FUNCTION.match(body)
    if not m:
        return None
    name = m.group(1).strip()
    props = ((tools or {}).get(name) or {}).get("properties") or {}
    args = {}
    for p in _PARAMETER.finditer(m.group(2)):
        key, value = p.group(1).strip(), p.group(2)
        # The format puts the value on its own lines: drop exactly that framing newline.
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        args[key] = _typed(value, props.get(key))
    return name, args


class ChatOutputParser:
    """Feed generated text piece by piece; get reasoning, content and tool calls back.

    `in_reasoning`: the prompt ended inside an open `<think>` block. `tools`: name ->
    parameters schema of the declared tools (None: tool-call markup is left as content).
    """

    def __init__(self, in_reasoning: bool = False, tools: dict[str, dict] | None = None,
                 max_calls: int | None = None):
        self.mode = "reasoning" if in_reasoning else "content"
        self.tools, self.max_calls = tools, max_calls
        self.buf = ""
        self.calls: list[ToolCall] = []
        self.content_seen = False
        self.strip_lead = False  # drop the blank lines the format puts after </think> and calls
        self.blank = ""          # blanks dropped before a <tool_call>

    def _tags(self) -> tuple[str, ...]:
        if self.mode == "reasoning":
            return (END_THINK,)
        if self.mode == "tool":
            return (END_CALL,)
        tags = (CALL,) if self.tools is not None else ()
        return tags if self.content_seen else (THINK, *tags)

    def feed(self, text: str) -> OutputDelta:
        """Account `text`; returns what is now certain."""
        self.buf += text
        out = OutputDelta()
        while True:
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if not hits:
                break
            at, tag = min(hits)
            before = self.buf[:at]
            if tag == CALL:  # blanks before a call are dropped, unless it turns out not to be one
                self.blank = before[len(before.rstrip()):]
                before = before.rstrip()
            self._emit(out, before)
            self.buf = self.buf[at + len(tag):]
            if tag == THINK:
                self.mode = "reasoning"
            elif tag == END_THINK:
                self.mode, self.strip_lead = "content", True
            elif tag == CALL:
                self.mode = "tool"
            else:  # END_CALL: the call's text is what came before the tag
                self.mode = "content"
        if self.mode != "tool":
            keep = _held(self.buf, tags)
            if self.mode == "content" and CALL in tags:  # trailing blanks may only lead up to a call
                keep = max(keep, len(self.buf) - len(self.buf[:len(self.buf) - keep].rstrip()))
            self._emit(out, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
        return out

    def _emit(self, out: OutputDelta, text: str) -> None:
        if self.mode == "tool":  # `text` is a whole call body
            self._call(out, text)
        elif self.mode == "reasoning":
            out.reasoning += text
        else:
            if self.strip_lead:
                text = text.lstrip()
                self.strip_lead = not text
            out.content += text
            self.content_seen = self.content_seen or bool(text.strip())

    def _call(self, out: OutputDelta, body: str) -> None:
        parsed = parse_tool_call(body, self.tools)
        if parsed is None:  # not a call after all: show the model's text as it was
            out.content += self.blank + CALL + body + END_CALL
            self.content_seen = True
            return
        name, args = parsed
        self.strip_lead = True
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return  # parallel_tool_calls false: calls after the first are dropped
        call = ToolCall("call_" + uuid.uuid4().hex[:24], name, json.dumps(args, ensure_ascii=False))
        self.calls.append(call)
        out.tool_calls.append(call)

    def finish(self) -> OutputDelta:
        """The end of the reply: flush what was held back (an unclosed call is parsed if it can be)."""
        out = OutputDelta()
        rest, self.buf = self.buf, ""
        if self.mode == "tool":
            parsed = parse_tool_call(rest, self.tools) if "</function>" in rest or rest.strip().endswith("}") else None
            if parsed is not None:
                self._call(out, rest)
            else:
                out.content += self.blank + CALL + rest
        elif self.mode == "reasoning":
            out.reasoning += rest
        else:  # blanks held before a call are dropped once a call was made
            self._emit(out, rest.rstrip() if self.calls else rest)
        return out


def parse_reply(text: str, in_reasoning: bool = False, tools: dict[str, dict] | None = None,
                max_calls: int | None = None) -> OutputDelta:
    """The whole reply at once (the non-streaming path): same parser, same result."""
    p = ChatOutputParser(in_reasoning, tools, max_calls)
    out = p.feed(text)
    out.add(p.finish())
    return out
