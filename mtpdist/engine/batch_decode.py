"""The coordinator's side of a returning unit, for many greedy sequences at once.

What `SequenceDecoder.on_result` does for one sequence (target logits, acceptance, MTP
drafts), done for every decode/verify step of a unit together: one norm + lm_head + argmax
over all rows, and one MTP-head pass per draft position for all sequences (attention on
each sequence's own MTP cache). The arithmetic that decides tokens is row-for-row the same
as alone, so outputs do not change; the head's work stops growing with the stream count.
"""

from __future__ import annotations

import time
from typing import Sequence

import mlx.core as mx

from ..model.qwen35 import Head
from .decoder import SequenceDecoder, Step
from .speculative import MTPDrafter


def batchable(dec: SequenceDecoder, step: Step) -> bool:
    """Greedy decode/verify steps whose drafter (if any) is the model's MTP head."""
    return (step.kind != "prefill" and dec.sampler.params.greedy
            and (dec.drafter is None or isinstance(dec.drafter, MTPDrafter)))


def deliver_greedy(head: Head, items: Sequence[tuple[SequenceDecoder, Step, mx.array]]) -> list[list[int]]:
    """Results of batchable steps -> each sequence's confirmed tokens (and its next drafts)."""
    hidden = items[0][2] if len(items) == 1 else mx.concatenate([h for _, _, h in items], axis=1)
    normed = head.norm(hidden)
    logits = head.logits(normed[0])
    target = mx.argmax(logits, axis=-1).tolist()
    outs, extend, r = [], [], 0
    for dec, step, h in items:
        T = h.shape[1]
        t, n = target[r:r + T], normed[:, r:r + T]
        r += T
        dec.waiting = False
        observe = None
        if step.kind == "verify":
            drafts, k = list(step.drafts), len(step.drafts)
            a = next((j for j in range(k) if t[j] != drafts[j]), k)
            out, rows = drafts[:a] + [t[a]], a + 1
            dec.stats.record(k, a)
            dec.rewind = k - a
            dec.drafter.rewind(dec.speculative)
            dec.speculative = 0
            observe = (k, a)
        else:
            out, rows = [t[-1]], T
            if dec.drafter is not None and (dec.stats.verify_passes or dec.confirmed):
                observe = (0, 0)          # a round without drafts (depth 0 chosen)
        _note_logprobs(dec, logits, r - T if step.kind == "verify" else r - 1, out)
        dec.pending = out[-1]
        dec.confirmed.extend(out)
        outs.append(out)
        if dec.drafter is not None:
            extend.append((dec, h[:, :rows], n[:, :rows], out, observe))
    if extend:
        _draft_all(head, extend)
    return outs


def _note_logprobs(dec: SequenceDecoder, logits: mx.array, first: int, out: list[int]) -> None:
    """Logprobs of `out` for a sequence that asked for them: rows first.. of the unit's logits."""
    if dec.logprobs_top is not None:
        dec.note_logprobs(logits[first:first + len(out)], out)


def _draft_all(head: Head, extend) -> None:
    mtp = extend[0][0].drafter.mtp
    wanted, rows = {}, []
    for i, (dec, h, n, toks, _) in enumerate(extend):
        dec.backlog.append((h, n, list(toks)))
        dec.drafts, dec.qs = [], []
        k = dec.depth.choose()
        if k == 0:              # no draft this round: the MTP head catches up later
            continue
        wanted[i] = k
        bh, bn, bt = dec.take_backlog()
        rows.append((i, dec, bn if dec.drafter.post_norm else bh, bt))
    last = _mtp_pass(head, mtp, rows) if rows else {}
    step = 0
    while True:
        live = [i for i in wanted if wanted[i] > step]
        if not live:
            break
        tokens = mx.argmax(head.logits(mx.concatenate([last[i] for i in live], axis=0)), axis=-1).tolist()
        for i, tok in zip(live, tokens):
            extend[i][0].drafts.append(tok)
            extend[i][0].qs.append(None)
        step += 1
        chain = [i for i in live if wanted[i] > step]
        if not chain:
            break
        last.update(_mtp_pass(head, mtp, [(i, extend[i][0], extend[i][0].drafter.last, [extend[i][0].drafts[-1]])
                                          for i in chain]))
        for i in chain:
            extend[i][0].speculative += 1
    now = time.perf_counter()
    for dec, _, _, _, observe in extend:
        if observe is not None:
            dec.depth.observe(observe[0], observe[1], now - dec._round_start)


def _mtp_pass(head: Head, mtp, rows) -> dict[int, mx.array]:
    """One ragged MTP-head pass over (key, decoder, input hidden [1, T, H], tokens) rows; each
    drafter's `last` is set and the last row of each (normed) is returned by key."""
    hidden = rows[0][2] if len(rows) == 1 else mx.concatenate([h for _, _, h, _ in rows], axis=1)
    tokens = [t for _, _, _, toks in rows for t in toks]
    z = mtp.ragged(hidden, head.embed(mx.array([tokens])), [(d.drafter.caches, len(toks)) for _, d, _, toks in rows])
    out, r = {}, 0
    for key, dec, _, toks in rows:
        r += len(toks)
        dec.drafter.last = z[:, r - 1:r]
        out[key] = z[0, r - 1:r]
    return out
