"""Token log-probabilities in OpenAI's two shapes (chat and legacy completions).

The numbers come from the engine (`mtpdist.engine.logprobs`): the log-softmax of the
target model's logits before temperature and filtering. A token's text is its own
decoding (a piece of a multi-byte character decodes to U+FFFD); chat's `bytes` are the
token's raw bytes for byte-level BPE tokenizers (Qwen's), so that the bytes of a reply's
tokens join into its UTF-8 text, and the UTF-8 of its text otherwise.
"""

from __future__ import annotations

from typing import Sequence


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte. Printable Latin-1 bytes
    stand for themselves; the other 68 are shifted, in order, to U+0100 and up."""
    own = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in own]
    return {**{chr(b): b for b in own}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_BYTE_OF = _byte_level_alphabet()


class TokenText:
    """Token id -> (its text, its bytes), remembered (top alternatives repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, token: int) -> str:
        return self.entry(token)[0]

    def bytes(self, token: int) -> list[int]:
        return self.entry(token)[1]

    def entry(self, token: int) -> tuple[str, list[int]]:
        got = self.known.get(token)
        if got is None:
            text = self.tokenizer.decode([token])
            got = self.known[token] = (text, self._raw(token, text))
        return got

    def _raw(self, token: int, text: str) -> list[int]:
        """The token's own bytes where the vocabulary is byte-level (checked against its decoding)."""
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            raw = bytes(_BYTE_OF[c] for c in piece)
        except (AttributeError, KeyError, TypeError, ValueError):
            raw = None
        if raw is not None and raw.decode("utf-8", "replace") == text:
            return list(raw)
        return list(text.encode("utf-8", "replace"))


def _entry(text: TokenText, token: int, logprob: float) -> dict:
    return {"token": text(token), "logprob": logprob, "bytes": text.bytes(token)}


def chat_logprobs(lps: Sequence, text: TokenText) -> dict:
    """Chat's `choice.logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}.

    Every generated token is listed, reasoning included (OpenAI has no place for it)."""
    content = [{**_entry(text, t.token, t.logprob), "top_logprobs": [_entry(text, i, v) for i, v in t.top]}
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
