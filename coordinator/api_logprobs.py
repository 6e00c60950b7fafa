"""Token log-probabilities in OpenAI's two shapes (chat and legacy completions).

The numbers come from the engine (`mtpdist.engine.logprobs`): the log-softmax of the
target model's logits before temperature and filtering. A token's text is its own
decoding; a token that is part of a multi-byte character decodes to U+FFFD, and chat's
`bytes` then gives that text's UTF-8, not the raw byte.
"""

from __future__ import annotations

from typing import Sequence


class TokenText:
    """Token id -> its text, remembered (top alternatives repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, token: int) -> str:
        text = self.known.get(token)
        if text is None:
            text = self.known[token] = self.tokenizer.decode([token])
        return text


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


def chat_logprobs(lps: Sequence, text: TokenText) -> dict:
    """Chat's `choice.logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}.

    Every generated token is listed, reasoning included (OpenAI has no place for it)."""
    content = [{**_entry(text(t.token), t.logprob), "top_logprobs": [_entry(text(i), v) for i, v in t.top]}
               for t in lps]
    return {"content": content, "refusal": None}


def completion_logprobs(lps: Sequence, text: TokenText, offset: int = 0) -> dict:
    """Completions' `choice.logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset.

    `offset`: characters of the completion already sent before these tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in lps:
        s = text(t.token)
        out["tokens"].append(s)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({text(i): v for i, v in t.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out
