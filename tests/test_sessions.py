"""Chats and agents as real clients send them: every turn resends the whole history through
/v1/chat/completions with the model's own chat template. State is kept at message boundaries,
so a second turn, a tool-call turn and a second conversation on a shared system prompt continue
from kept state — and their greedy output is the same as with reuse off."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mtpdist.coordinator.local_cluster import LocalCluster

from servers import Coordinator

DEMO = Path(__file__).parent.parent / "mtpdist" / "demo_model"
SYSTEM = ("You are a careful senior Python engineer. Answer with code first, then one short sentence. "
          "Prefer the standard library; name things clearly; handle errors explicitly. ") * 6
TOOLS = [{"type": "function", "function": {
    "name": "run_tests", "description": "Run the project's tests and return the failures",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two coordinators over the same two workers: reuse on, and reuse off (the reference)."""
    with LocalCluster(2, tmp_path_factory.mktemp("sessions")) as cluster:
        workers = sum((["--worker", a] for a in cluster.addresses), [])
        on = Coordinator("--model", str(DEMO), "--mtp", "--mtp-depth", "2", "--insecure", *workers)
        try:
            off = Coordinator("--model", str(DEMO), "--mtp", "--mtp-depth", "2", "--insecure", "--no-prefix-reuse",
                              *workers)
            try:
                client = lambda c: openai.OpenAI(base_url=c.url, api_key="none", max_retries=0, timeout=300)  # noqa
                yield client(on), client(off)
            finally:
                off.stop()
        finally:
            on.stop()


def ask(client, messages, **kw):
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, **kw)
    return r.choices[0].message, r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens


@pytest.mark.parametrize("thinking", [False, True])
def test_second_turn_continues_from_the_first(pair, thinking):
    on, off = pair
    kw = {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}
    history = [{"role": "system", "content": SYSTEM + ("thinking" if thinking else "")},
               {"role": "user", "content": "Write a function that parses an ISO date."}]
    first, cached, _ = ask(on, history, **kw)
    assert cached == 0
    history += [{"role": "assistant", "content": first.content or ""},
                {"role": "user", "content": "Now make it accept a time zone too."}]
    second, cached, total = ask(on, history, **kw)
    assert cached > total // 2, (cached, total)      # the system prompt and the first question, at least
    assert second.content == ask(off, history, **kw)[0].content


def test_tool_call_turn_continues(pair):
    on, off = pair
    history = [{"role": "system", "content": SYSTEM + "tools"},
               {"role": "user", "content": "Run the tests in tests/unit and fix what fails."}]
    ask(on, history, tools=TOOLS)
    history += [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "run_tests", "arguments": '{"path": "tests/unit"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "FAILED test_dates.py::test_tz - KeyError"}]
    reply, cached, total = ask(on, history, tools=TOOLS)
    assert cached > total // 2, (cached, total)
    assert reply.content == ask(off, history, tools=TOOLS)[0].content


def test_second_conversation_shares_the_system_prompt(pair):
    on, off = pair
    system = {"role": "system", "content": SYSTEM + "fleet"}
    ask(on, [system, {"role": "user", "content": "List the files in a folder."}], tools=TOOLS)
    other = [system, {"role": "user", "content": "Count the lines of a file."}]
    reply, cached, total = ask(on, other, tools=TOOLS)
    assert cached > total // 2, (cached, total)
    assert reply.content == ask(off, other, tools=TOOLS)[0].content
