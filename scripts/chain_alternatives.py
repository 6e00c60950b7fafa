"""How often the MTP chain's second (third) choice is the target where its first choice misses.

The engine's own drafter (`MTPDrafter`) runs the chain from every position of a greedy
continuation of the bench prompts, as rounds do: draft 1 from the backbone's hidden state,
later drafts from the head's own output. Prints conditional acceptance by chain depth and, where
the first choice missed, the share where the second or third was the target: what a draft tree
of width 2-3 could recover. Runs on the CPU in about 20 s for the demo model.

    python scripts/chain_alternatives.py [--model mtpdist/demo_model] [--positions 100] [--prompts 4]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from mtpdist.coordinator.bench_streams import PROMPTS
from mtpdist.coordinator.local_session import load_tokenizer_for
from mtpdist.engine.drafter import MTPDrafter
from mtpdist.model.loader import load_parts


def greedy_hidden(parts, ids: list[int], n: int) -> tuple[mx.array, list[int]]:
    """Backbone hidden rows [len-1+n, H] of prompt + greedy continuation, and all its tokens."""
    caches = parts.stack.make_caches()
    h = parts.stack(parts.head.embed(mx.array([ids])), caches)
    rows, toks = [h[0]], list(ids)
    for _ in range(n):
        toks.append(int(mx.argmax(parts.head.logits(parts.head.norm(rows[-1][-1]))).item()))
        rows.append(parts.stack(parts.head.embed(mx.array([[toks[-1]]])), caches)[0])
    return mx.concatenate(rows, axis=0), toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mtpdist/demo_model")
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--depth", type=int, default=8)
    args = ap.parse_args()
    parts = load_parts(args.model, head=True, mtp=True)
    tok = load_tokenizer_for(args.model)
    D = args.depth
    tried, held, missed, second, third = (np.zeros(D) for _ in range(5))
    for prompt in PROMPTS[:args.prompts]:
        ids = list(tok.encode(prompt))
        H, toks = greedy_hidden(parts, ids, args.positions + D + 1)
        normed = parts.head.norm(H)
        d = MTPDrafter(parts.head, parts.mtp)
        p0 = len(ids) - 1
        d.extend(H[None, :p0], normed[None, :p0], toks[1:p0 + 1])
        for base in range(p0, p0 + args.positions):
            logits = d.extend(H[None, base:base + 1], normed[None, base:base + 1], [toks[base + 1]])
            alive = True
            for j in range(D):
                order = np.argsort(-np.array(logits.astype(mx.float32)))[:3]
                target = toks[base + 2 + j]
                if alive:
                    tried[j] += 1
                    if order[0] == target:
                        held[j] += 1
                    else:
                        missed[j] += 1
                        second[j] += order[1] == target
                        third[j] += order[2] == target
                        alive = False
                if j < D - 1:
                    logits = d.chain(int(order[0]))
            d.rewind(D - 1)
    cond = held / np.maximum(tried, 1)
    print("conditional acceptance by depth:", np.round(cond, 3).tolist())
    print("cumulative:", np.round(np.cumprod(cond), 3).tolist())
    print("second choice right where the first missed:", np.round(second / np.maximum(missed, 1), 3).tolist())
    print("third choice right where the first missed: ", np.round(third / np.maximum(missed, 1), 3).tolist())
    print("drafts tried by depth:", tried.astype(int).tolist())


if __name__ == "__main__":
    main()
