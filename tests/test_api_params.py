"""`n`, `logprobs` / `top_logprobs` and the `model` check, with the official `openai` client against
real coordinators over real workers; the small API hardening fixes (issue 17 items 6 and 8)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import openai
import pytest

from mtpdist.coordinator.local_cluster import LocalCluster

from servers import Coordinator

# The bundled demo model: trained, so its MTP head's greedy drafts are often accepted.
DEMO = Path(__file__).parent.parent / "mtpdist" / "demo_model"
PROMPT = "def main(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument("  # > 16 tokens: kept
MSGS = [{"role": "user", "content": "write a function that adds two numbers"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two coordinators over the same two workers: one with MTP (test names accepted), one plain
    that serves only its model folder's name."""
    with LocalCluster(2, tmp_path_factory.mktemp("params")) as cluster:
        workers = sum((["--worker", a] for a in cluster.addresses), [])
        mtp = Coordinator("--model", str(DEMO), "--mtp", "--insecure", *workers)
        try:
            plain = Coordinator("--model", str(DEMO), "--insecure", *workers, names=())
            try:
                client = lambda c: openai.OpenAI(base_url=c.url, api_key="none", max_retries=0, timeout=120)  # noqa
                yield client(mtp), client(plain), plain
            finally:
                plain.stop()
        finally:
            mtp.stop()


def test_n_greedy_choices_are_identical_and_forked(pair):
    client, _, _ = pair
    one = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
    three = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens            # the prompt counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    # Choices 1 and 2 continued from the prompt state choice 0 prefilled (all but the last token).
    assert three.model_extra["cached_tokens_by_choice"][1:] == [one.usage.prompt_tokens - 1] * 2
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0, n=3,
                                                 stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    whole = client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0)
    assert list(texts.values()) == [whole.choices[0].message.content] * 3
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 3
    assert chunks[-1].usage.completion_tokens == 3 * whole.usage.completion_tokens


def test_n_sampled_gives_distinct_reproducible_choices(pair):
    client, _, _ = pair
    kw = dict(model="m", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2 and a.choices[0].text != a.choices[1].text
    assert [c.text for c in a.choices] == [c.text for c in b.choices]      # a seed fixes every choice


def _chat_logprobs(client, **kw):
    r = client.chat.completions.create(model=kw.pop("model", "m"), messages=MSGS, max_tokens=32, logprobs=True,
                                       top_logprobs=5, **kw)
    return r, r.choices[0].logprobs.content


def test_chat_logprobs_greedy_are_the_argmax_and_sorted(pair):
    client, _, _ = pair
    r, content = _chat_logprobs(client, temperature=0)
    assert len(content) == r.usage.completion_tokens
    bare = client.chat.completions.create(model="m", messages=MSGS, max_tokens=32, temperature=0)
    assert r.choices[0].message.content == bare.choices[0].message.content   # logprobs change no token
    # A token's bytes are its own (a piece of a multi-byte character too): they join into the reply
    assert bytes(b for t in content for b in t.bytes).decode() == r.choices[0].message.content
    for t in content:
        assert math.isfinite(t.logprob) and t.logprob <= 0 and len(t.top_logprobs) == 5
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(x) for x in tops) <= 1 + 1e-5
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        if "\ufffd" not in t.token:
            assert t.bytes == list(t.token.encode())


def test_logprobs_same_with_mtp_on_and_off(pair):
    client, plain, served = pair
    model = plain.models.list().data[0].id
    r_on, on = _chat_logprobs(client, temperature=0)
    r_off, off = _chat_logprobs(plain, temperature=0, model=model)
    assert r_on.model_extra["mtp"]["accepted"] > 0 and r_off.model_extra["mtp"]["drafted"] == 0, r_on.model_extra
    assert [t.token for t in on] == [t.token for t in off]
    for a, b in zip(on, off):   # tokens accepted in a verify pass get the target's own numbers
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [x.logprob for x in a.top_logprobs] == pytest.approx([x.logprob for x in b.top_logprobs], abs=1e-3)


def test_completion_logprobs_sampled_streamed_and_not(pair):
    client, _, _ = pair
    kw = dict(model="m", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=3, logprobs=3)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(math.isfinite(x) and x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) >= x - 1e-6
        if tok in top and len(set(lp.tokens)) == len(lp.tokens):
            assert top[tok] == pytest.approx(x)
    parts = list(client.completions.create(stream=True, **kw))
    streamed = [x for p in parts if p.choices[0].logprobs for x in p.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_unknown_model_is_404(pair):
    client, plain, served = pair
    ids = [m.id for m in plain.models.list().data]
    with pytest.raises(openai.NotFoundError) as e:
        plain.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and ids[0] in e.value.message
    assert plain.completions.create(model=ids[0], prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2
    assert client.models.list().data[0].id == "m"      # --served-model-name m tiny: the first is listed
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).model == "m"


@pytest.mark.parametrize("body,param,words", [
    ({"temperature": float("nan")}, "temperature", "finite number"),
    ({"top_p": float("inf")}, "top_p", "finite number"),
    ({"stop": ["ok", "\ud800"]}, "stop", "lone surrogate"),
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
])
def test_bad_completion_parameters(pair, body, param, words):
    _, _, served = pair
    # Python's json writes NaN / Infinity, as some clients do (httpx's json= refuses to)
    r = httpx.post(served.url + "/completions", timeout=30, headers={"content-type": "application/json"},
                   content=json.dumps({"prompt": "x", "max_tokens": 2, **body}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("body,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_logprobs(pair, body, param):
    _, _, served = pair
    r = httpx.post(served.url + "/chat/completions", timeout=30, json={"messages": MSGS, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _requests_counted(url: str, status: str) -> float:
    for line in httpx.get(url[:-3] + "/metrics").text.splitlines():
        if line.startswith("mtpdist_requests_total{") and 'endpoint="/v1/completions"' in line \
                and f'status="{status}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_stream_hang_up_is_counted_as_499(pair):
    _, _, served = pair
    before_ok, before_gone = _requests_counted(served.url, "200"), _requests_counted(served.url, "499")
    with httpx.stream("POST", served.url + "/completions", timeout=60,
                      json={"prompt": PROMPT, "stream": True}) as r:  # up to 512 tokens
        for line in r.iter_lines():
            if line.startswith("data: "):
                break                      # hang up after the first event
    deadline = time.time() + 20
    while _requests_counted(served.url, "499") == before_gone and time.time() < deadline:
        time.sleep(0.2)
    assert _requests_counted(served.url, "499") == before_gone + 1
    assert _requests_counted(served.url, "200") == before_ok


def test_token_bytes_join_into_the_text_across_split_characters():
    from mlx_lm.utils import load_tokenizer

    from mtpdist.coordinator.api_logprobs import TokenText
    tok = load_tokenizer(DEMO)
    text = TokenText(tok)
    s = "héllo wörld — “quotes” 日本語"
    ids = tok.encode(s, add_special_tokens=False)
    assert any(text(i) == "\ufffd" for i in ids)          # some tokens are pieces of one character
    assert bytes(b for i in ids for b in text.bytes(i)).decode() == s
