"""The OpenAI-compatible API with the official `openai` client, a real coordinator and real workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mtpdist.coordinator.local_cluster import LocalCluster
from mtpdist.wire.client import WorkerClient

from servers import Coordinator

KEY = "test-api-key"


@pytest.fixture(scope="module")
def served(tiny_dense, tmp_path_factory):
    with LocalCluster(2, tmp_path_factory.mktemp("api")) as cluster:
        c = Coordinator("--model", str(tiny_dense[0]), "--mtp", "--insecure", "--api-key", KEY,
                        *sum((["--worker", a] for a in cluster.addresses), []))
        try:
            yield c, cluster, openai.OpenAI(base_url=c.url, api_key=KEY, max_retries=0, timeout=120)
        finally:
            c.stop()


def generate_json(model, prompt, n):
    p = subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(model), "--prompt", prompt,
                        "--max-tokens", str(n), "--json"], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def test_completions_match_generate(served, tiny_dense):
    _, _, client = served
    want = generate_json(tiny_dense[0], "def main():", 12)
    r = client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0)
    assert r.choices[0].text == want["text"] and r.usage.completion_tokens == 12
    assert r.model_extra["mtp"]["drafted"] > 0
    parts = list(client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == want["text"]
    assert parts[-1].usage.total_tokens == want["prompt_tokens"] + 12


def test_chat_streaming_and_not(served, tiny_dense):
    _, _, client = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=10,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    from mlx_lm.utils import load_tokenizer
    ids = load_tokenizer(tiny_dense[0]).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert r.usage.prompt_tokens == len(ids)


def test_models_health_metrics_cluster(served):
    c, cluster, client = served
    assert [m.id for m in client.models.list().data]
    base = c.url[:-3]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    metrics = httpx.get(base + "/metrics").text
    assert "mtpdist_generated_tokens_total" in metrics and "mtpdist_pipeline_overhead_seconds_count" in metrics
    assert 'mtpdist_mtp_rounds_at_depth_total{depth="1"}' in metrics      # acceptance by depth
    assert 'mtpdist_mtp_rounds_held_at_depth_total{depth="1"}' in metrics
    # One stream through 2 workers with MTP: its verify rounds went out two at a time.
    spec = next(ln for ln in metrics.splitlines() if ln.startswith("mtpdist_mtp_speculative_rounds_total"))
    assert float(spec.split()[-1]) > 0 and "mtpdist_mtp_voided_rounds_total" in metrics
    info = httpx.get(c.url + "/cluster", headers={"authorization": f"Bearer {KEY}"}).json()
    assert [w["address"] for w in info["workers"]] == cluster.addresses
    assert info["workers"][0]["layers"][0] == 0 and info["workers"][1]["layers"][1] == 8
    assert "/v1/chat/completions" in httpx.get(base + "/openapi.json").json()["paths"]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x " * 40000}]}, "messages"),
])
def test_bad_requests_get_openai_errors(served, body, param):
    c, _, client = served
    r = httpx.post(c.url + "/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_malformed_json_wrong_key_and_harmless_fields(served):
    c, _, client = served
    h = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(c.url + "/completions", content=b'{"prompt": "x", ', headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(c.url + "/completions", json={"prompt": "x"}, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=c.url, api_key="nope", max_retries=0).models.list()
    ok = client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0, user="u1",
                                   extra_body={"metadata": {"a": "b"}, "presence_penalty": 0})
    assert ok.usage.completion_tokens == 2     # harmless fields accepted; still serving


def test_disconnect_mid_stream_frees_worker_state(served):
    c, cluster, _ = served
    with httpx.stream("POST", c.url + "/completions", json={"prompt": "import os", "max_tokens": 400,
                                                             "temperature": 0, "stream": True},
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data:"))
        busy = max(WorkerClient(a).describe().sequences for a in cluster.addresses)
        assert busy == 1
    deadline = time.time() + 20
    while time.time() < deadline:
        if all(WorkerClient(a).describe().sequences == 0 for a in cluster.addresses):
            break
        time.sleep(0.2)
    assert all(WorkerClient(a).describe().sequences == 0 for a in cluster.addresses)


def test_concurrent_clients_all_correct(served, tiny_dense):
    _, _, client = served
    prompts = ["class A:", "import re", "for i in", "while True:"]
    want = {p: generate_json(tiny_dense[0], p, 8)["text"] for p in prompts}

    def ask(p):
        return p, client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts * 2))
    assert all(text == want[p] for p, text in got)


def test_next_turn_reports_cached_tokens(served):
    """A prompt that extends an earlier one continues from the state the workers kept."""
    _, _, client = served
    first_prompt = "def add(a, b):\n    return a + b\n\n" * 3
    first = client.completions.create(model="tiny", prompt=first_prompt, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(model="tiny", prompt=first_prompt + first.choices[0].text + "\ndef sub(",
                                       max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
