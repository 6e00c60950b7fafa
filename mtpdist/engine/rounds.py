"""The coordinator's side of a returning unit: target logits, acceptance, next drafts.

For every decode/verify step of a unit together: one norm + lm_head over all rows, the
acceptance test per sequence (`accept`, greedy or sampled), then the next drafts, with one
ragged MTP-head pass per draft position for all sequences that draft with the MTP head
(other drafters, such as test oracles, run one by one). One sequence alone is a unit of one,
so every caller runs this same code and each row's arithmetic is the same as alone.
"""

from __future__ import annotations

import time
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..model.qwen35 import Head
from .decoder import SequenceDecoder, Step
from .drafter import MTPDrafter
from .sampling import Sampler


def accept(sampler: Sampler, drafts: Sequence[int], qs: Sequence[np.ndarray | None], logits: mx.array,
           target: Sequence[int] | None) -> tuple[list[int], int]:
    """Tokens a round confirms and how many drafts held. `logits` [k+1, V] are the target's at
    [pending, d1..dk]; `target` their argmax (greedy). Greedy keeps drafts while they equal the
    argmax; sampled accepts d_j with probability min(1, p/q) and corrects from max(p - q, 0)."""
    k = len(drafts)
    if sampler.params.greedy:
        a = next((j for j in range(k) if target[j] != drafts[j]), k)
        return list(drafts[:a]) + [target[a]], a
    for j in range(k):
        ok, tok = sampler.verify(sampler.probs(logits[j]), drafts[j], qs[j])
        if not ok:
            return list(drafts[:j]) + [tok], j
    return list(drafts) + [sampler.sample(logits[k])], k


def resolve_unit(head: Head, items: Sequence[tuple[SequenceDecoder, Step, mx.array]]) -> list[list[int]]:
    """Results of decode/verify steps (pre-norm hidden [1, T, H] each) -> each sequence's
    confirmed tokens; every decoder is left with its next drafts."""
    hidden = items[0][2] if len(items) == 1 else mx.concatenate([h for _, _, h in items], axis=1)
    normed = head.norm(hidden)
    logits = head.logits(normed[0])
    greedy = any(d.sampler.params.greedy for d, _, _ in items)
    target = mx.argmax(logits, axis=-1).tolist() if greedy else None
    outs, drafting, r = [], [], 0
    for dec, step, h in items:
        T = h.shape[1]
        out, a = accept(dec.sampler, step.drafts, dec.round_qs(step), logits[r:r + T],
                        target[r:r + T] if greedy else None)
        dec.note_logprobs(logits[r:r + len(out)], out)   # row j of a round chose out[j]
        n = normed[:, r:r + T]
        r += T
        observe = dec.confirm(step, out, a)
        outs.append(out)
        if dec.drafter is not None:
            rows = a + 1 if step.kind == "verify" else T
            if dec.rounds:      # it held and rounds sent after it stay in flight: no new drafts
                dec.backlog.append((h[:, :rows], n[:, :rows], list(out)))
                if observe is not None:
                    dec.depth.observe(*observe[:2], _took(dec), observe[2])
            else:
                drafting.append((dec, h[:, :rows], n[:, :rows], out, observe))
    if drafting:
        _draft_all(head, drafting)
    now = time.perf_counter()
    for dec, _, _ in items:
        dec.ready_at = now
    return outs


def _pick(dec: SequenceDecoder, logits: mx.array) -> None:
    """Append one draft (argmax, or a draw from the filtered draft distribution) and its q."""
    if dec.sampler.params.greedy:
        d, q = int(mx.argmax(logits).item()), None
    else:
        q = dec.sampler.probs(logits)
        d = dec.sampler.draw(q)
    dec.drafts.append(d)
    dec.qs.append(q)


def _draft_all(head: Head, entries) -> None:
    wanted: dict[int, int] = {}
    for i, (dec, h, n, toks, _) in enumerate(entries):
        dec.backlog.append((h, n, list(toks)))
        dec.drafts, dec.qs = [], []
        k = dec.depth.choose()
        if k:               # k == 0: no draft this round; the MTP head catches up later
            wanted[i] = k
    batched = {i for i in wanted if isinstance(entries[i][0].drafter, MTPDrafter)}
    logits: dict[int, mx.array] = {}
    if batched:
        rows = []
        for i in sorted(batched):
            dec = entries[i][0]
            bh, bn, bt = dec.take_backlog()
            rows.append((i, dec, bn if dec.drafter.post_norm else bh, bt))
        logits.update(_mtp_logits(head, rows))
    for i in wanted.keys() - batched:
        logits[i] = entries[i][0].drafter.extend(*entries[i][0].take_backlog())
    step = 0
    while True:
        live = [i for i in wanted if wanted[i] > step]
        if not live:
            break
        for i in live:
            _pick(entries[i][0], logits[i])
        step += 1
        chain = [i for i in live if wanted[i] > step]
        logits = _mtp_logits(head, [(i, entries[i][0], entries[i][0].drafter.last, [entries[i][0].drafts[-1]])
                                    for i in chain if i in batched]) if batched else {}
        for i in chain:
            dec = entries[i][0]
            if i not in batched:
                logits[i] = dec.drafter.chain(dec.drafts[-1])
            dec.speculative += 1
    now = time.perf_counter()
    for dec, _, _, _, observe in entries:
        if observe is not None:
            dec.depth.observe(*observe[:2], _took(dec, now), observe[2])


def _took(dec: SequenceDecoder, now: float | None = None) -> float | None:
    """The confirmed round's latency, or None for a stacked round (it also waited in line)."""
    return None if dec.round_start is None else (now or time.perf_counter()) - dec.round_start


def _mtp_logits(head: Head, rows) -> dict[int, mx.array]:
    """One ragged MTP-head pass over (key, decoder, input hidden [1, T, H], tokens) rows and one
    lm_head over their last rows; each drafter's `last` is set; draft logits [V] by key."""
    if not rows:
        return {}
    mtp = rows[0][1].drafter.mtp
    hidden = rows[0][2] if len(rows) == 1 else mx.concatenate([h for _, _, h, _ in rows], axis=1)
    tokens = [t for _, _, _, toks in rows for t in toks]
    z = mtp.ragged(hidden, head.embed(mx.array([tokens])), [(d.drafter.caches, len(toks)) for _, d, _, toks in rows])
    lasts, r = [], 0
    for _, dec, _, toks in rows:
        r += len(toks)
        dec.drafter.last = z[:, r - 1:r]
        lasts.append(z[0, r - 1:r])
    logits = head.logits(mx.concatenate(lasts, axis=0) if len(lasts) > 1 else lasts[0])
    return {key: logits[j] for j, (key, _, _, _) in enumerate(rows)}
