"""The reply parser on Qwen3.5-style replies (thinking, XML and JSON tool calls), whole and streamed."""

from __future__ import annotations

import json
import random

import pytest

from mtpdist.coordinator.chat import ChatRequestError, chat_spec, check_json_reply, schema_error
from mtpdist.coordinator.chat_output import ChatOutputParser, parse_reply

TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                          "metric": {"type": "boolean"}}},
         "run_shell": {"type": "object", "properties": {"command": {"type": "string"}}},
         "write_file": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                                                         "mode": {"type": "object"}}}}

# Replies in the shape Qwen3.5 / Qwen3-Coder write them (prompt ended with "<think>\n" when thinking).
THINK_THEN_XML_CALL = (
    "The user wants the weather in Paris for two days. I should call get_weather.\n</think>\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
    "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>")
TWO_CALLS_AFTER_TEXT = (
    "I'll look at the directory first, then write the file.\n\n<tool_call>\n<function=run_shell>\n"
    "<parameter=command>\nls -la /tmp\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=write_file>\n"
    "<parameter=path>\n/tmp/a.py\n</parameter>\n<parameter=content>\ndef f(x):\n    return x < 3 and x > 1\n\n"
    "</parameter>\n<parameter=mode>\n{\"append\": false}\n</parameter>\n</function>\n</tool_call>")
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>'
THINK_THEN_ANSWER = "Two plus two: 4. Check: yes.\n</think>\n\nThe answer is **4**."
NOT_A_CALL = "Use the <tool_call> tag like <tool_call>this</tool_call> in docs."


def stream(text, in_reasoning=False, tools=TOOLS, seed=0):
    """Feed `text` in random pieces (tags split across them); gather what comes out."""
    rng = random.Random(seed)
    p = ChatOutputParser(in_reasoning, tools)
    reasoning, content, calls = [], [], []
    i = 0
    while i < len(text):
        n = rng.randint(1, 7)
        d = p.feed(text[i:i + n])
        i += n
        reasoning.append(d.reasoning), content.append(d.content), calls.extend(d.tool_calls)
    d = p.finish()
    reasoning.append(d.reasoning), content.append(d.content), calls.extend(d.tool_calls)
    return "".join(reasoning), "".join(content), calls


def test_thinking_then_xml_tool_call():
    out = parse_reply(THINK_THEN_XML_CALL, in_reasoning=True, tools=TOOLS)
    assert out.reasoning.startswith("The user wants") and out.reasoning.endswith("get_weather.\n")
    assert out.content == ""
    [call] = out.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2, "metric": True}


def test_text_then_two_xml_calls_keep_code_verbatim():
    out = parse_reply(TWO_CALLS_AFTER_TEXT, tools=TOOLS)
    assert out.content == "I'll look at the directory first, then write the file."
    a, b = out.tool_calls
    assert (a.name, json.loads(a.arguments)) == ("run_shell", {"command": "ls -la /tmp"})
    assert json.loads(b.arguments) == {"path": "/tmp/a.py", "content": "def f(x):\n    return x < 3 and x > 1\n",
                                       "mode": {"append": False}}
    assert a.id != b.id and a.id.startswith("call_")


def test_parallel_tool_calls_false_keeps_the_first_call():
    [only] = parse_reply(TWO_CALLS_AFTER_TEXT, tools=TOOLS, max_calls=1).tool_calls
    assert only.name == "run_shell"
    p = ChatOutputParser(False, TOOLS, max_calls=1)
    calls = [c for i in range(0, len(TWO_CALLS_AFTER_TEXT), 5) for c in p.feed(TWO_CALLS_AFTER_TEXT[i:i + 5]).tool_calls]
    assert [c.name for c in calls + p.finish().tool_calls] == ["run_shell"]


def test_json_format_call_and_plain_thinking_answer():
    [call] = parse_reply(JSON_CALL, tools=TOOLS).tool_calls
    assert json.loads(call.arguments) == {"city": "Oslo", "days": 1}
    out = parse_reply(THINK_THEN_ANSWER, in_reasoning=True)
    assert (out.reasoning, out.content) == ("Two plus two: 4. Check: yes.\n", "The answer is **4**.")
    out = parse_reply("<think>\nhmm\n</think>\n\nHello", tools=None)  # a model that opens the block itself
    assert (out.reasoning, out.content) == ("\nhmm\n", "Hello")


def test_markup_is_content_without_tools_or_when_unparseable():
    assert parse_reply(JSON_CALL, tools=None).content == JSON_CALL          # tool_choice none / no tools
    out = parse_reply(NOT_A_CALL, tools=TOOLS)
    assert out.content == NOT_A_CALL and not out.tool_calls
    out = parse_reply("x <tool_call>\n<function=run_shell>\n<parameter=command>\nls", tools=TOOLS)
    assert out.content == "x <tool_call>\n<function=run_shell>\n<parameter=command>\nls"  # cut off: shown as is
    out = parse_reply("ok <tool_call>\n<function=run_shell>\n<parameter=command>\nls\n</parameter>\n</function>\n",
                      tools=TOOLS)                                          # hit max_tokens before </tool_call>
    assert json.loads(out.tool_calls[0].arguments) == {"command": "ls"}


@pytest.mark.parametrize("text,in_reasoning", [(THINK_THEN_XML_CALL, True), (TWO_CALLS_AFTER_TEXT, False),
                                                (JSON_CALL, False), (THINK_THEN_ANSWER, True), (NOT_A_CALL, False),
                                                ("a < b and c <t", False), ("plain\n\n", False)])
@pytest.mark.parametrize("seed", range(6))
def test_streamed_in_any_pieces_equals_whole(text, in_reasoning, seed):
    whole = parse_reply(text, in_reasoning, TOOLS)
    reasoning, content, calls = stream(text, in_reasoning, seed=seed)
    assert (reasoning, content) == (whole.reasoning, whole.content)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_partial_tags_are_held_back_not_leaked():
    p = ChatOutputParser(False, TOOLS)
    d = p.feed("Sure <tool_")
    assert d.content == "Sure" and not d.tool_calls        # "<tool_" may be a tag; the blank may lead to one
    d = p.feed("call>\n<function=run_shell>\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>")
    assert d.content == "" and d.tool_calls[0].name == "run_shell"


def test_schema_checks_and_json_reply():
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}
    assert schema_error({"name": "x", "age": 3, "tags": ["a"]}, schema) is None
    assert "missing required property 'age'" in schema_error({"name": "x"}, schema)
    assert "expected integer" in schema_error({"name": "x", "age": True}, schema)
    assert "unexpected property" in schema_error({"name": "x", "age": 1, "z": 0}, schema)
    assert "$.tags[0]" in schema_error({"name": "x", "age": 1, "tags": ["c"]}, schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    assert check_json_reply('{"name": "x", "age": 3}', fmt)["valid"]
    bad = check_json_reply('{"name": "x"', fmt)
    assert not bad["valid"] and "not valid JSON" in bad["error"]
    assert not check_json_reply("[1]", {"type": "json_object"})["valid"]
    odd = {"type": "json_schema", "json_schema": {"schema": {"properties": ["x"], "required": 3}}}
    assert check_json_reply('{"a": 1}', odd) == {"type": "json_schema", "valid": False,
                                                 "error": "the schema uses a form this server cannot check"}


def test_chat_spec_tool_choice_and_response_format():
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in TOOLS.items()]
    user = [{"role": "user", "content": "hi"}]
    spec = chat_spec(user, tools, {"type": "function", "function": {"name": "run_shell"}}, None, None)
    assert [t["function"]["name"] for t in spec.tools] == ["run_shell"]
    assert "must answer by calling the function run_shell" in spec.messages[0]["content"]
    assert chat_spec(user, tools, "none", None, None).tool_schemas() is None
    with pytest.raises(ChatRequestError) as e:
        chat_spec(user, tools, {"type": "function", "function": {"name": "nope"}}, None, None)
    assert e.value.param == "tool_choice"
    with pytest.raises(ChatRequestError):
        chat_spec(user, None, "required", None, None)
    for odd in ({"type": "function", "function": "run_shell"}, {"type": "function"}):
        with pytest.raises(ChatRequestError):
            chat_spec(user, tools, odd, None, None)
    with pytest.raises(ChatRequestError) as e:
        chat_spec([*user, {"role": "assistant", "tool_calls": [{"function": "x"}]}], tools, None, None, None)
    assert e.value.param == "messages.1.tool_calls.0.function"
    with pytest.raises(ChatRequestError):
        chat_spec(user, None, None, {"type": "json_schema", "json_schema": "s"}, None)
    with pytest.raises(ChatRequestError):
        chat_spec(user, None, None, {"type": "json_schema", "json_schema": {}}, None)
    with pytest.raises(ChatRequestError):
        chat_spec(user, None, None, None, {"tokenize": True})
    msgs = [{"role": "system", "content": "be brief"}, *user]
    spec = chat_spec(msgs, None, None, {"type": "json_object"}, {"enable_thinking": True})
    assert spec.messages[0]["content"].startswith("be brief\n\nReply with one JSON object")
    assert spec.template_kwargs == {"enable_thinking": True}
    spec = chat_spec([*user, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "run_shell", "arguments": '{"command": "ls"}'}}]}],
        tools, "auto", None, None)
    assert spec.messages[1]["tool_calls"][0]["function"]["arguments"] == {"command": "ls"}
