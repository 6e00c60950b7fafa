"""The most one stream could gain from verify rounds in flight, given the MTP chain's accuracy.

The engine's own drafter runs its chain from every position of a greedy continuation of the
bench prompts (as `chain_alternatives.py` does) and records where the chain first misses,
whether its second choice was right there, and its confidence in each draft. Then ideal
pipelines are walked along each continuation: free hops, a coordinator that drafts in no time,
every stage busy. A stage of an emulated Mac costs (A + B*(T-1)) / N for T rows on N stages,
as `mtpdist worker --emulate-ms` sleeps.

- One whole Mac, depth k: a round of k + 1 rows confirms the drafts up to the first miss and
  one more token.
- N stages, depth k, rounds in flight: a round leaves stage 1 every stage time. Each round
  verifies the next k + 1 tokens of the same chain (its first row is the guess of the bonus
  token of the round under it), so it holds only if every round under it held. The first
  round that misses returns N stage times after it left; the rounds on top of it are void,
  and the next round starts from the confirmed tokens. A chain that holds through every
  recorded draft goes on with no restart, as the chain recorded from where it stops.
- With --branches, two bounds on draft trees across the pipeline, the one lever left. "free":
  every miss where the chain's second choice was right costs no restart, and the branch costs
  nothing (no such tree exists: it bounds them all). "1 row": each round carries one more row,
  the second choice at its least confident draft, for the round under it; a miss there costs
  no restart. Both still assume a rescued chain drafts as well as a fresh one.

Prints tok/s of the best depth up to --max-depth for each side and their ratios, per prompt
and over all. Nothing real can beat these: they bound what `bench --scenario macs` measures.

    python scripts/pipeline_ceiling.py [--emulate-ms 120,12] [--tokens 48] [--prompts 8] [--branches]
"""

from __future__ import annotations

import argparse
import random
from typing import NamedTuple

import mlx.core as mx

from chain_alternatives import greedy_hidden  # same folder: python puts it on sys.path
from mtpdist.coordinator.bench_streams import PROMPTS
from mtpdist.coordinator.local_session import load_tokenizer_for
from mtpdist.engine.drafter import MTPDrafter
from mtpdist.model.loader import load_parts


class Chain(NamedTuple):
    """A chain run from one position: its first miss (1-based; len(top) + 1 if none), whether
    the second choice was the target there, and the top draft's probability at each depth."""
    miss: int
    second: bool
    top: list[float]


def chains(parts, ids: list[int], tokens: int, depth: int) -> list[Chain]:
    """One `Chain` of `depth` drafts from each position of a greedy continuation of `ids`."""
    H, toks = greedy_hidden(parts, ids, tokens + depth + 1)
    normed = parts.head.norm(H)
    d = MTPDrafter(parts.head, parts.mtp)
    p0 = len(ids) - 1
    d.extend(H[None, :p0], normed[None, :p0], toks[1:p0 + 1])
    out = []
    for base in range(p0, p0 + tokens):
        logits = d.extend(H[None, base:base + 1], normed[None, base:base + 1], [toks[base + 1]])
        miss, second, top = depth + 1, False, []
        for j in range(depth):
            p = mx.softmax(logits.astype(mx.float32))
            first, runner_up = mx.argsort(-p)[:2].tolist()
            top.append(p[first].item())
            if miss > depth and first != toks[base + 2 + j]:
                miss, second = j + 1, runner_up == toks[base + 2 + j]
            if j < depth - 1:
                logits = d.chain(first)
        d.rewind(depth - 1)
        out.append(Chain(miss, second, top))
    return out


def independent(accept: list[float], positions: int, seed: int = 0) -> list[Chain]:
    """Synthetic chains whose drafts hold with these conditional rates by depth, each position
    drawn on its own: what held-out acceptance figures promise if misses do not cluster."""
    rng = random.Random(seed)
    out = []
    for _ in range(positions):
        miss = next((j + 1 for j, c in enumerate(accept) if rng.random() >= c), len(accept) + 1)
        out.append(Chain(miss, False, [1.0] * len(accept)))
    return out


def one_mac(run: list[Chain], k: int, a: float, b: float) -> tuple[int, float]:
    """Tokens and ms for one whole Mac at depth k along one continuation."""
    i = n = 0
    t = 0.0
    while i < len(run):
        got = min(run[i].miss - 1, k) + 1
        n, t, i = n + got, t + a + b * k, i + got
    return n, t


def stages(run: list[Chain], k: int, a: float, b: float, n_stages: int, branch: str = "") -> tuple[int, float]:
    """Tokens and ms for N stages at depth k with rounds in flight, ideal; `branch` "" (none),
    "free" or "1 row" (see the module's docstring)."""
    s = (a + b * (k + (branch == "1 row"))) / n_stages
    i = n = 0
    t = 0.0
    while i < len(run):
        c, held = run[i], 0
        if c.miss > len(c.top):     # no miss in the recorded drafts: those rounds hold, no restart
            got = len(c.top) // (k + 1) * (k + 1)
            n, t, i = n + got, t + got // (k + 1) * s, i + got
            continue
        while c.miss > (held + 1) * (k + 1):      # the round after `held` held rounds also holds
            held += 1
        got = min(c.miss, (held + 1) * (k + 1))
        rescued = got == c.miss and c.second and (branch == "free" or (branch == "1 row" and _least_sure(
            c, held * (k + 1) + 1, (held + 1) * (k + 1)) == c.miss))
        n, t, i = n + got, t + (held + (1 if rescued else n_stages)) * s, i + got
    return n, t


def _least_sure(c: Chain, lo: int, hi: int) -> int:
    """The chain index in [lo, hi] whose draft the head was least sure of."""
    return min(range(lo, min(hi, len(c.top)) + 1), key=lambda j: c.top[j - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mtpdist/demo_model")
    ap.add_argument("--emulate-ms", default="120,12", help="the whole Mac: A,B")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-depth", type=int, default=3)
    ap.add_argument("--stage-counts", default="2,4")
    ap.add_argument("--chain", type=int, default=24, help="drafts recorded per position")
    ap.add_argument("--branches", action="store_true", help="also the two bounds on draft trees")
    ap.add_argument("--independent", metavar="C1,C2,...",
                    help="instead of the model: synthetic chains with these conditional acceptances by depth "
                         "(the last repeats to --chain drafts), misses drawn independently")
    args = ap.parse_args()
    a, b = (float(x) for x in args.emulate_ms.split(","))
    counts = [int(x) for x in args.stage_counts.split(",")]
    kinds = [""] + (["1 row", "free"] if args.branches else [])
    depths = range(1, args.max_depth + 1)
    sides = [(1, "")] + [(c, kind) for c in counts for kind in kinds]
    totals = {(side, k): [0, 0.0] for side in sides for k in depths}
    print(f"emulated, {args.emulate_ms} (whole Mac); ideal: free hops and drafting; "
          f"{args.tokens} tokens a prompt; best depth up to {args.max_depth}")
    if args.independent:
        cond = [float(x) for x in args.independent.split(",")]
        runs = [independent((cond + [cond[-1]] * args.chain)[:args.chain], 200_000)]
    else:
        parts = load_parts(args.model, head=True, mtp=True)
        tok = load_tokenizer_for(args.model)
        runs = (chains(parts, list(tok.encode(prompt)), args.tokens, args.chain) for prompt in PROMPTS[:args.prompts])
    for p, run in enumerate(runs):
        rates = {}
        for (c, kind), k in totals:
            n, t = one_mac(run, k, a, b) if c == 1 else stages(run, k, a, b, c, kind)
            totals[((c, kind), k)][0] += n
            totals[((c, kind), k)][1] += t
            rates[((c, kind), k)] = 1000 * n / t
        print(_line("synthetic" if args.independent else f"prompt {p}", rates, sides, depths, a))
    if not args.independent:
        print(_line("all", {key: 1000 * n / t for key, (n, t) in totals.items()}, sides, depths, a))


def _line(name: str, rates: dict, sides, depths, a: float) -> str:
    best = {side: max(rates[(side, k)] for k in depths) for side in sides}
    one = best[(1, "")]
    out = [f"{name:9s} 1 Mac {one:5.1f} tok/s"]
    for (c, kind), r in best.items():
        if c > 1:
            label = f"{c} stages" + (f" + {kind} branch" if kind else "")
            out.append(f"{label} {r:5.1f} ({r / one:.2f}x one Mac, {r * a / 1000:.2f}x plain)")
    return " | ".join(out)


if __name__ == "__main__":
    main()
