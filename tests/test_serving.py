"""Serving as users (and hostile clients) expect: OpenAI errors for bad input, abandoned work
stops, a bounded queue, a responsive event loop, bounded metrics, and the chat features
(tools, tool_choice, response_format, enable_thinking) through the real server and the
official `openai` client."""

from __future__ import annotations

import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mtpdist.coordinator.local_cluster import LocalCluster
from mtpdist.coordinator.metrics import ROUTES

from servers import Coordinator

KEY = "serving-key"
H = {"authorization": f"Bearer {KEY}"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_dense, tmp_path_factory):
    with LocalCluster(1, tmp_path_factory.mktemp("serving")) as cluster:
        c = Coordinator("--model", str(tiny_dense[0]), "--insecure", "--api-key", KEY, "--max-queue", "2",
                        "--worker", cluster.addresses[0])
        try:
            yield c, openai.OpenAI(base_url=c.url, api_key=KEY, max_retries=0, timeout=120)
        finally:
            c.stop()


def post(c, path, **kw):
    return httpx.post(c.url + path, headers={**H, "content-type": "application/json"}, timeout=120, **kw)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def metric(c, name, **labels) -> float:
    text = httpx.get(c.url[:-3] + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_idle(c, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(c.url[:-3] + "/health").json()["queue_depth"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_hostile_input_gets_openai_errors_never_5xx(server):
    c, client = server
    for seed in (-1, -7, 2 ** 70):  # any integer is a valid seed
        assert client.completions.create(model="m", prompt="x", max_tokens=2, seed=seed).usage.completion_tokens == 2
    err = assert_openai_error(post(c, "/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}'), 400)
    assert err["param"] == "prompt" and "surrogate" in err["message"]
    err = assert_openai_error(post(c, "/chat/completions", content=b'{"messages": [{"role": "user", '
                                                                  b'"content": "a\\udfffb"}], "max_tokens": 2}'), 400)
    assert err["param"] == "messages"
    assert_openai_error(post(c, "/completions", content=b'{"prompt": "\xff\xfe", "max_tokens": 2}'), 400)
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_openai_error(post(c, "/completions", content=deep), 400)
    assert_openai_error(post(c, "/completions", content=b'{"prompt": ' + deep + b"}"), 400)
    assert_openai_error(httpx.get(c.url[:-3] + "/no/such/path"), 404)
    greedy = client.completions.create(model="m", prompt="def f(", max_tokens=16, temperature=0)
    tiny = client.completions.create(model="m", prompt="def f(", max_tokens=16, temperature=1e-300)
    assert tiny.choices[0].text == greedy.choices[0].text       # a tiny temperature is greedy, not garbage
    assert httpx.get(c.url[:-3] + "/health").json()["status"] == "ok"


def test_metrics_labels_stay_bounded_under_random_paths(server):
    c, _ = server
    for _ in range(150):
        httpx.get(f"{c.url}/{uuid.uuid4().hex}")                   # 401: no key
        httpx.post(f"{c.url[:-3]}/{uuid.uuid4().hex}", headers=H)  # 404
    text = httpx.get(c.url[:-3] + "/metrics").text
    labels = set(re.findall(r'endpoint="([^"]*)"', text))
    assert labels <= ROUTES | {"other"} and "other" in labels
    assert metric(c, "mtpdist_requests_total", endpoint="other", status="401") >= 150


def test_abandoned_non_streaming_requests_stop_their_generation(server):
    c, client = server
    before = metric(c, "mtpdist_requests_total", endpoint="/v1/completions", status="499")
    for i in range(2):
        with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
            httpx.post(c.url + "/completions", headers=H, timeout=1.5,
                       json={"prompt": f"import os{i}", "max_tokens": 20000, "temperature": 0})
    # Each would run 20000 tokens; both must stop once their clients are gone.
    assert wait_idle(c, 30), "abandoned generations kept running"
    assert metric(c, "mtpdist_requests_total", endpoint="/v1/completions", status="499") == before + 2
    # Greedy: a sampled reply may meet EOS early and end short.
    assert client.completions.create(model="m", prompt="x", max_tokens=4, temperature=0).usage.completion_tokens == 4


def test_queue_is_bounded_with_429_and_retry_after(server):
    c, client = server

    def ask(i):  # sampled at temperature 1 (seeded): a few hundred tokens each, all sent at once
        return post(c, "/completions", json={"prompt": f"class A{i}:", "max_tokens": 400, "seed": i})
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    full = [r for r in answers if r.status_code == 429]
    assert full and sum(r.status_code == 200 for r in answers) >= 2        # --max-queue 2
    for r in full:
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(ask, i) for i in range(2)]
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert all(f.result().status_code in (200, 429) for f in futs)
    assert wait_idle(c, 30)
    # Still serving (greedy: a sampled reply may meet EOS early and end short).
    assert client.completions.create(model="m", prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_a_huge_prompt_does_not_block_health(server):
    c, _ = server
    done = {}

    def big():
        done["r"] = post(c, "/completions", json={"prompt": "def f(x): return x\n" * 500_000, "max_tokens": 2})
    t = threading.Thread(target=big)
    t.start()
    time.sleep(1.0)  # the 10 MB body is uploaded and being tokenized
    worst, answers = 0.0, 0
    while t.is_alive() and answers < 20:
        t0 = time.perf_counter()
        assert httpx.get(c.url[:-3] + "/health", timeout=30).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        answers += 1
        time.sleep(0.05)
    t.join()
    assert answers >= 3, "the big prompt was tokenized too fast for this test to mean anything"
    assert worst < 1.0, f"/health took {worst:.1f} s while a big prompt was tokenized"
    err = assert_openai_error(done["r"], 400)
    assert err["code"] == "context_length_exceeded"


def prompt_len(model, msgs, **kw) -> int:
    return len(load_tokenizer(model).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw))


def test_tools_rendered_by_the_models_template_and_streamed_like_not(server, tiny_dense):
    c, client = server
    r = client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, tool_choice="auto", max_tokens=12,
                                       temperature=0)
    assert r.usage.prompt_tokens == prompt_len(tiny_dense[0], MSGS, tools=TOOLS)
    assert r.usage.prompt_tokens > prompt_len(tiny_dense[0], MSGS)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, max_tokens=12,
                                                 temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    none = client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert none.usage.prompt_tokens == prompt_len(tiny_dense[0], MSGS)      # "none": tools not rendered
    named = client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, max_tokens=2,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.usage.prompt_tokens > r.usage.prompt_tokens                # the instruction to call it
    one = client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, max_tokens=2, parallel_tool_calls=False)
    assert one.usage.prompt_tokens == r.usage.prompt_tokens
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=4)
    want = [*history[:2], {**history[2], "tool_calls": [{**history[2]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}, history[3]]
    assert r2.usage.prompt_tokens == prompt_len(tiny_dense[0], want, tools=TOOLS)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_thinking_is_returned_as_reasoning_content_streamed_too(server, tiny_dense):
    c, client = server
    kw = dict(model="m", messages=MSGS, max_tokens=16, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = client.chat.completions.create(**kw)
    assert r.usage.prompt_tokens == prompt_len(tiny_dense[0], MSGS, enable_thinking=True)
    # The template opened <think>; this model never closes it, so all it wrote is reasoning.
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    assert reasoning and not r.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for ch in chunks if ch.choices)
    assert streamed == reasoning and sum(1 for ch in chunks if ch.choices and
                                         (ch.choices[0].delta.model_extra or {}).get("reasoning_content")) > 1
    off = client.chat.completions.create(**{**kw, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})
    assert off.choices[0].message.content and "reasoning_content" not in (off.choices[0].message.model_extra or {})


def test_response_format_is_asked_for_and_checked(server, tiny_dense):
    c, client = server
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}):
        r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0, response_format=fmt)
        assert r.usage.prompt_tokens > prompt_len(tiny_dense[0], MSGS)    # the instruction is in the prompt
        check = r.model_extra["response_format"]
        assert check["type"] == fmt["type"] and check["valid"] is False and "not valid JSON" in check["error"]
        chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0,
                                                     response_format=fmt, stream=True))
        assert [ch.model_extra.get("response_format") for ch in chunks if ch.model_extra.get("response_format")] \
            == [check]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=2, response_format={"type": "yaml"})


def test_n_choices_count_against_the_queue(server):
    c, client = server
    for seed in range(1, 9):                     # one long request keeps the queue at 1 of --max-queue 2
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, c, "/completions", json={"prompt": "class A:", "max_tokens": 1500,
                                                                 "seed": seed})
            deadline = time.time() + 10
            while time.time() < deadline and httpx.get(c.url[:-3] + "/health").json()["queue_depth"] < 1:
                time.sleep(0.02)
            try:
                client.completions.create(model="m", prompt="x", max_tokens=2, n=2)
                refused = False
            except openai.RateLimitError:         # 1 + 2 choices > 2
                refused = True
            long = running.result()
            assert long.status_code == 200
        # Ran all its 1,500 tokens: it was surely still queued when the n=2 request came. One that
        # met EOS may have ended just before (its response not yet back): then try another seed.
        if refused or long.json()["choices"][0]["finish_reason"] == "length":
            break
    assert refused
    assert wait_idle(c, 30)
    # Alone, any n runs (greedy: a sampled reply may meet EOS early and end short).
    alone = client.completions.create(model="m", prompt="x", max_tokens=2, n=3, temperature=0)
    assert len(alone.choices) == 3 and alone.usage.completion_tokens == 6
