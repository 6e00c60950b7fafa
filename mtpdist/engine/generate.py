"""Requests and results, the coordinator-side model parts (`Generator`), and one request's
confirmed tokens turned into streamed text (`Output`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..model import rowstable
from ..model.loader import ModelParts
from .decoder import Drafter
from .depth import DepthPolicy
from .drafter import MTPDrafter
from .sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: token ids in, how to decode and when to stop."""

    prompt_ids: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    mtp: bool = False
    mtp_depth: int | str = 1    # 1..8, or "auto"
    ignore_eos: bool = False    # run to max_tokens (benchmarks, tests)
    logprobs: int | None = None  # per token, its logprob and this many top alternatives (0..20); None: none
    boundaries: tuple[int, ...] = ()  # prompt positions worth keeping state at (ends of chat messages)


@dataclass(frozen=True)
class GenerationResult:
    """What a finished generation produced, with its timing and MTP statistics."""
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    drafted: int
    accepted: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    verify_passes: int = 0
    acceptance_by_depth: tuple[float, ...] = ()  # cumulative, see SpecStats
    rounds_by_depth: tuple[tuple[int, int], ...] = ()  # per depth j: (rounds drafting >= j, first j all held)
    time_to_first_token: float = 0.0
    cached_tokens: int = 0      # prompt tokens continued from a kept state instead of prefilled
    rounds: dict = field(default_factory=dict)  # rounds in flight: max, speculative, voided, wasted rows

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens, "prompt_tps": round(self.prompt_tps, 3),
                "generation_tps": round(self.generation_tps, 3), "drafted": self.drafted,
                "accepted": self.accepted, "acceptance": round(self.acceptance, 4),
                "verify_passes": self.verify_passes, "acceptance_by_depth": list(self.acceptance_by_depth),
                "acceptance_by_depth_kind": "cumulative",
                "time_to_first_token": round(self.time_to_first_token, 4), "cached_tokens": self.cached_tokens,
                "finish_reason": self.finish_reason, "rounds": dict(self.rounds),
                # Whether greedy output here equals plain greedy decoding, on this backend (issue 17.2).
                "greedy_identity": rowstable.identity_note()}


@dataclass
class Delta:
    """Newly confirmed text and tokens; `result` is set on the last one."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None
    logprobs: list | None = None   # a TokenLogprob per token of token_ids, when the request asked


class Generator:
    """The coordinator-side model parts (embedding, final norm, lm_head, MTP head) and the
    tokenizer; the scheduler decodes every request with them."""

    def __init__(self, parts: ModelParts, tokenizer, post_norm: bool = True, prefill_step: int = 512,
                 make_drafter: Callable[[GenerationRequest], Drafter | None] | None = None,
                 make_depth: Callable[[GenerationRequest], DepthPolicy] | None = None):
        """`tokenizer` None: token ids only (no text). `make_drafter` replaces the MTP head as the
        source of drafts, `make_depth` the request's depth setting (tests use oracles and scripted
        depths)."""
        self.parts, self.tokenizer = parts, tokenizer
        self.post_norm, self.prefill_step = post_norm, prefill_step
        self.make_drafter, self.make_depth = make_drafter, make_depth
        eos = set(parts.config.eos_token_ids)
        eos.update(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos = frozenset(eos)

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of a prompt."""
        return tuple(self.tokenizer.encode(text))

    def check(self, req: GenerationRequest) -> None:
        """Refuse a request this generator cannot run."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if req.mtp and self.parts.mtp is None and self.make_drafter is None:
            raise ValueError("MTP was requested but the MTP head is not loaded")

    def drafter(self, req: GenerationRequest) -> Drafter | None:
        """A fresh drafter for one sequence (None without MTP)."""
        if not req.mtp:
            return None
        if self.make_drafter is not None:
            return self.make_drafter(req)
        return MTPDrafter(self.parts.head, self.parts.mtp, self.post_norm)

class Output:
    """One request's confirmed tokens -> text deltas (EOS, max tokens, stop strings), then its result."""

    def __init__(self, generator: Generator, req: GenerationRequest):
        self.req, self.eos = req, generator.eos
        self.detok = _TextTail(generator.tokenizer, req.stop)
        self.tokens: list[int] = []
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.finish_reason = "length"
        self.cached_tokens = 0

    @property
    def done(self) -> bool:
        return self.finish_reason == "stop" or len(self.tokens) >= self.req.max_tokens

    def add(self, step: Sequence[int], logprobs: list | None = None) -> Delta | None:
        """Confirmed tokens of one step; the Delta to send, if any."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        new = []
        for tok in step:
            if len(self.tokens) >= self.req.max_tokens:
                break
            if tok in self.eos and not self.req.ignore_eos:
                self.finish_reason = "stop"
                break
            self.tokens.append(tok)
            new.append(tok)
        text, hit = self.detok.add(new)
        if hit:
            self.finish_reason = "stop"
        return Delta(text, new, logprobs=_kept(logprobs, new)) if text or new else None

    def finish(self, stats) -> Delta:
        """The last Delta, carrying the GenerationResult."""
        t_end = time.perf_counter()
        tail = self.detok.flush()
        n_gen = max(len(self.tokens) - 1, 0)
        gen_time = (t_end - self.t_first) if self.t_first else 0.0
        ttft = (self.t_first or t_end) - self.t0
        result = GenerationResult(
            text=self.detok.text, token_ids=tuple(self.tokens), prompt_tokens=len(self.req.prompt_ids),
            generation_tokens=len(self.tokens), prompt_tps=len(self.req.prompt_ids) / max(ttft, 1e-9),
            generation_tps=n_gen / gen_time if gen_time > 0 else 0.0,
            drafted=stats.drafted, accepted=stats.accepted, finish_reason=self.finish_reason,
            verify_passes=stats.verify_passes, acceptance_by_depth=tuple(stats.acceptance_by_depth()),
            rounds_by_depth=tuple(zip(stats.tried_at, stats.accepted_at)),
            time_to_first_token=ttft, cached_tokens=self.cached_tokens,
            rounds={"max_in_flight": stats.max_rounds_in_flight, "speculative": stats.speculative_rounds,
                    "voided": stats.voided_rounds, "wasted_rows": stats.wasted_rows,
                    "drafted_ahead": stats.drafted_ahead})
        return Delta(tail, [], result)


def _kept(logprobs: list | None, new: list[int]) -> list | None:
    """The logprobs of the tokens kept (those before EOS / the token limit)."""
    return None if logprobs is None else logprobs[:len(new)]


class _TextTail:
    """Incremental detokenization that equals `tokenizer.decode(all ids)`, cut at stop strings.

    Each step decodes only a short window of recent tokens and appends what the newest
    tokens add (waiting while a UTF-8 character is incomplete), so cost does not grow
    with the output. Text that could still grow into a stop string is held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.keep = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; tokens already turned into text
        self.decoded = ""   # decode(ids[:read])
        self.text = ""      # final text so far (stop string cut off)
        self.sent = 0       # characters already handed out
        self.hit = False

    def _advance(self, final: bool = False) -> None:
        if self.tokenizer is None:   # token ids only
            return
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.decoded += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, ids: list[int]) -> tuple[str, bool]:
        if self.hit:
            return "", True
        self.ids.extend(ids)
        self._advance()
        return self._update(self.decoded)

    def _update(self, full: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.keep)  # a stop string can only begin in the new tail
        for s in self.stop:
            i = full.find(s, start)
            if i >= 0:
                full, self.hit = full[:i], True
        safe = len(full)
        if not self.hit:
            for s in self.stop:
                k = next((k for k in range(min(len(s) - 1, safe), 0, -1) if full.endswith(s[:k])), 0)
                safe = min(safe, len(full) - k)
        self.text = full
        out = full[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, self.hit

    def flush(self) -> str:
        out = ""
        if not self.hit:
            self._advance(final=True)
            out, _ = self._update(self.decoded)
        out += self.text[self.sent:]
        self.sent = len(self.text)
        return out
