"""Chat requests into prompts with the model's own chat template; JSON replies checked.

What is enforced and what is only asked of the model (there is no constrained decoding):
- `tools` are rendered by the model's template; `tool_choice` "none" renders no tools and
  parses no calls; "required" and a named function are asked for in the system prompt
  (a named choice also renders only that tool) but not forced.
- `response_format` json_object / json_schema is asked for in the system prompt, and the
  reply is checked: the response says whether it parsed and matched the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
               "integer": int, "number": (int, float)}


class ChatRequestError(ValueError):
    """A chat request we cannot render; `param` names the field at fault."""
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatSpec:
    """A validated chat request, ready for the template."""
    messages: tuple
    tools: tuple | None               # OpenAI tool objects rendered into the prompt
    template_kwargs: dict
    response_format: dict | None      # None or {"type": "json_object"} / {"type": "json_schema", ...}

    def tool_schemas(self) -> dict[str, dict] | None:
        """name -> parameters schema, for parsing calls (None: calls are not parsed)."""
        if not self.tools:
            return None
        return {t["function"]["name"]: t["function"].get("parameters") or {} for t in self.tools}


@dataclass(frozen=True)
class ChatPrompt:
    """The rendered prompt, whether the reply starts inside an open `<think>` block, and the
    message boundaries: token counts at which the prompt ends a message (state kept there
    serves the next turn of this conversation, or others that share its system prompt)."""
    ids: tuple[int, ...]
    in_reasoning: bool
    boundaries: tuple[int, ...] = ()


def _message(m: dict, i: int) -> dict:
    out = {k: v for k, v in m.items() if v is not None}
    if out.get("role") == "developer":
        out["role"] = "system"
    calls = []
    for j, c in enumerate(out.get("tool_calls") or []):
        fn = c.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatRequestError("a tool call needs function.name", f"messages.{i}.tool_calls.{j}.function")
        fn = dict(fn)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):  # OpenAI sends a JSON string; templates want a mapping
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise ChatRequestError("tool call arguments are not valid JSON",
                                       f"messages.{i}.tool_calls.{j}.function.arguments") from None
        calls.append({**c, "function": {**fn, "arguments": args}})
    if calls:
        out["tool_calls"] = calls
    out.setdefault("content", "")
    return out


def _instruction(spec_tools, tool_choice, response_format) -> str:
    parts = []
    if tool_choice == "required":
        parts.append("You must answer by calling one or more of the functions provided.")
    elif isinstance(tool_choice, dict):
        parts.append(f"You must answer by calling the function {tool_choice['function']['name']}.")
    if response_format and response_format["type"] == "json_object":
        parts.append("Reply with one JSON object and nothing else.")
    elif response_format and response_format["type"] == "json_schema":
        schema = response_format["json_schema"].get("schema") or {}
        parts.append("Reply with one JSON value that matches this JSON schema, and nothing else:\n"
                     + json.dumps(schema, ensure_ascii=False))
    return "\n\n".join(parts)


def chat_spec(messages: list[dict], tools: list[dict] | None, tool_choice, response_format: dict | None,
              template_kwargs: dict | None) -> ChatSpec:
    """Check the chat-specific fields and build what the template gets."""
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ChatRequestError("tool_choice needs tools", "tool_choice")
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        raise ChatRequestError("tool_choice must be none, auto, required or a named function", "tool_choice")
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or name not in names:
            raise ChatRequestError(f"tool_choice names a function that is not among the tools: {name!r}",
                                   "tool_choice")
        tools = [t for t in tools if t["function"]["name"] == name]
    if tool_choice == "none":
        tools = None
    if response_format is not None:
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ChatRequestError("response_format.type must be text, json_object or json_schema",
                                   "response_format")
        spec = response_format.get("json_schema")
        if kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
            raise ChatRequestError("response_format json_schema needs json_schema.schema (an object)",
                                   "response_format")
        response_format = None if kind == "text" else response_format
    extra = _instruction(tools, tool_choice, response_format)
    if extra:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{extra}".lstrip()}
        else:
            msgs.insert(0, {"role": "system", "content": extra})
    kwargs = dict(template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "tokenize", "chat_template"):
        if reserved in kwargs:
            raise ChatRequestError(f"chat_template_kwargs may not set {reserved!r}", "chat_template_kwargs")
    return ChatSpec(tuple(msgs), tuple(tools) if tools else None, kwargs, response_format)


def render(tokenizer, spec: ChatSpec) -> ChatPrompt:
    """Render with the model's own chat template and tokenize (slow for big prompts: run off the event loop)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatRequestError("this model has no chat template; use /v1/completions", "messages")
    if spec.tools and "tools" not in template:
        raise ChatRequestError("this model's chat template does not render tools", "tools")
    try:
        text = tokenizer.apply_chat_template(list(spec.messages), tools=list(spec.tools) if spec.tools else None,
                                             add_generation_prompt=True, tokenize=False, **spec.template_kwargs)
    except Exception as e:  # jinja raises many kinds; the message is what the caller needs
        raise ChatRequestError(f"cannot apply the chat template: {e}", "messages") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatRequestError("messages hold text that is not valid Unicode (a lone surrogate)", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ChatPrompt(tuple(ids), text.rstrip().endswith("<think>"), message_boundaries(tokenizer, spec, text, ids))


# Boundaries are looked for at the system prompt and the last few messages: those are what a
# later request shares (an agent fleet's tools; this conversation's next turn).
RECENT_MESSAGES = 6


def message_boundaries(tokenizer, spec: ChatSpec, text: str, ids) -> tuple[int, ...]:
    """Token counts where the rendered prompt ends a message, found with the template itself:
    the conversation cut after message i, rendered without a generation prompt, where that
    text and its tokens are a prefix of the whole prompt's. Templates that render a message
    differently depending on what follows simply yield fewer boundaries."""
    msgs = list(spec.messages)
    cuts = {i for i in range(1, len(msgs) + 1) if len(msgs) - i < RECENT_MESSAGES}
    if msgs and msgs[0]["role"] == "system":
        cuts.add(1)
    found = set()
    for i in sorted(cuts):
        try:
            part = tokenizer.apply_chat_template(msgs[:i], tools=list(spec.tools) if spec.tools else None,
                                                 add_generation_prompt=False, tokenize=False, **spec.template_kwargs)
        except Exception:  # a template that cannot render a partial conversation: no boundary here
            continue
        if not part or not text.startswith(part) or len(part) == len(text):
            continue
        head = tokenizer.encode(part, add_special_tokens=False)
        if 0 < len(head) < len(ids) - 1 and list(ids[:len(head)]) == head:
            found.add(len(head))
    return tuple(sorted(found))


def schema_error(value, schema: dict, where: str = "$") -> str | None:
    """Why `value` does not match `schema` (common JSON-schema keywords), or None."""
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf")
        if all(schema_error(value, s, where) for s in options):
            return f"{where}: matches none of the allowed schemas"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: {value!r} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{where}: must be {schema['const']!r}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        ok = any(isinstance(value, _JSON_TYPES.get(k, object)) and not (k in ("integer", "number")
                 and isinstance(value, bool)) and not (k == "integer" and isinstance(value, float)
                 and not value.is_integer()) for k in kinds)
        if not ok:
            return f"{where}: expected {' or '.join(kinds)}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{where}: missing required property {key!r}"
        props = schema.get("properties", {})
        for key, v in value.items():
            if key in props:
                err = schema_error(v, props[key], f"{where}.{key}")
                if err:
                    return err
            elif schema.get("additionalProperties") is False:
                return f"{where}: unexpected property {key!r}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            err = schema_error(v, schema["items"], f"{where}[{i}]")
            if err:
                return err
    return None


def check_json_reply(content: str, response_format: dict) -> dict:
    """Whether a reply honours response_format: {"type", "valid", "error"} for the response."""
    out = {"type": response_format["type"], "valid": False, "error": None}
    try:
        value = json.loads(content)
    except ValueError as e:
        out["error"] = f"the reply is not valid JSON: {e}"
        return out
    if response_format["type"] == "json_object" and not isinstance(value, dict):
        out["error"] = "the reply is JSON but not an object"
        return out
    if response_format["type"] == "json_schema":
        try:
            out["error"] = schema_error(value, response_format["json_schema"]["schema"])
        except (TypeError, AttributeError, ValueError, KeyError, RecursionError):  # a schema we cannot read
            out["error"] = "the schema uses a form this server cannot check"
        if out["error"]:
            return out
    out["valid"] = True
    return out
