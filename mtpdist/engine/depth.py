"""How many tokens to draft per round: a fixed depth, or one chosen from measurements.

`AutoDepth` keeps, per draft position j, how often the j-th draft held given that the ones
before it did, and per depth k the wall time of a whole round (verify pass plus drafting).
It picks the k that maximises expected tokens per second,
(1 + sum_j prod_{i<=j} r_i) / time(k), tries every depth a few times first, and re-tries a
neighbour now and then so that a drifting acceptance rate or cost is noticed.
"""

from __future__ import annotations

from typing import Protocol


class DepthPolicy(Protocol):
    """Chooses the draft depth for the next round and learns from each verified round."""
    def choose(self) -> int: ...
    def observe(self, depth: int, accepted: int, seconds: float | None, guessed: bool | None = None) -> None:
        """A verified round: its depth, drafts accepted, latency (None: stacked), and whether the
        round stacked on it guessed its bonus token (None: none was, or a draft failed)."""


class FixedDepth:
    """Always the same depth."""

    def __init__(self, k: int):
        if not 1 <= k <= 8:
            raise ValueError("MTP depth must be between 1 and 8")
        self.k = k

    def choose(self) -> int:
        return self.k

    def observe(self, depth: int, accepted: int, seconds: float | None, guessed: bool | None = None) -> None:
        pass

    def summary(self) -> dict:
        return {"mode": "fixed", "depth": self.k}


class AutoDepth:
    """Depth from measured acceptance by position and measured round time by depth."""

    def __init__(self, max_depth: int = 4, warmup: int = 3, revisit_every: int = 32, ema: float = 0.2,
                 allow_plain: bool = False):
        if not 1 <= max_depth <= 8:
            raise ValueError("MTP depth must be between 1 and 8")
        self.max_depth, self.warmup, self.revisit_every, self.ema = max_depth, warmup, revisit_every, ema
        self.min_depth = 0 if allow_plain else 1   # 0: no draft this round (plain decode)
        self.tried = [0] * max_depth        # position j reached (all before it held)
        self.held = [0] * max_depth
        self.time: dict[int, float] = {}    # depth -> EMA of round seconds
        self.rounds: dict[int, int] = {}
        self.chosen = 0                     # choices made after the warm-up
        self.current = max_depth
        self.stages = 1                     # pipeline stages (the scheduler keeps it current)

    def conditional(self) -> list[float]:
        """P(draft j holds | drafts before it held): a weak prior of 1/2 for the first draft, and
        for each later one the estimate of the draft before it. Chained drafts that have held
        tend to keep holding (the demo head, held out: 0.81, 0.85, 0.89, 0.89 at positions 1-4),
        so a deep position seen a few unlucky times in the warm-up is not written off."""
        out, prior = [], 0.5
        for h, t in zip(self.held, self.tried):
            prior = (h + 2 * prior) / (t + 2)
            out.append(prior)
        return out

    def expected_tokens(self, k: int) -> float:
        """Tokens a round of depth k confirms on average: the bonus plus the accepted prefix."""
        total, run = 1.0, 1.0
        for r in self.conditional()[:k]:
            run *= r
            total += run
        return total

    def rate(self, k: int, window: int) -> float:
        """Expected tokens per second at depth k with `window` rounds in flight through `stages`.
        A round's wall time is the pipeline's latency; rounds in flight each take one stage's
        share of it, but a round that does not hold whole (a draft rejected, or the next round's
        guess of its bonus wrong) leaves the slots of the rounds stacked on it void."""
        t = self.time[k]
        if window <= 1 or k == 0:
            return self.expected_tokens(k) / t
        c = self.conditional()
        held = 1.0
        for j in range(k + 1):              # k drafts and the guess of the bonus token
            held *= c[min(j, len(c) - 1)]
        w = min(window, self.stages)
        return self.expected_tokens(k) * w / t / (1 + (1 - held) * (w - 1))

    def choose(self) -> int:
        for k in range(self.max_depth, self.min_depth - 1, -1):  # warm-up: every depth a few rounds
            if self.rounds.get(k, 0) < self.warmup:
                self.current = k
                return k
        if not self.time:
            return self.current
        best = self.best()
        # Look again at a neighbour now and then: one choice in `revisit_every`, counted by choices
        # (a batch's sequences all choose before any of them is observed again).
        self.chosen += 1
        if self.chosen % self.revisit_every == 0:
            up = (self.chosen // self.revisit_every) % 2
            best = min(self.max_depth, best + 1) if up else max(self.min_depth, best - 1)
        self.current = best
        return best

    def best(self) -> int:
        """The measured depth with the highest expected rate (no look at a neighbour)."""
        return max(self.time, key=lambda k: max(self.rate(k, 1), self.rate(k, self.stages)))

    def observe(self, depth: int, accepted: int, seconds: float | None, guessed: bool | None = None) -> None:
        """Learn from a verified round; `seconds` (its latency) is None for a stacked round. A guess
        of its bonus token by the round stacked on it (`guessed`) counts as draft depth + 1: with
        rounds in flight that position decides whether stacked rounds hold, and rounds of the
        depth chosen never draft it themselves."""
        self.rounds[depth] = self.rounds.get(depth, 0) + 1
        for j in range(min(depth, accepted + 1)):
            self.tried[j] += 1
            self.held[j] += j < accepted
        if guessed is not None and depth < self.max_depth:
            self.tried[depth] += 1
            self.held[depth] += guessed
        if seconds is None:
            return
        old = self.time.get(depth)
        self.time[depth] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def window(self) -> int:
        """Rounds in flight for the current depth: the pipeline's stages when that is faster."""
        if self.stages <= 1 or self.current not in self.time:
            return self.stages
        return self.stages if self.rate(self.current, self.stages) > self.rate(self.current, 1) else 1

    def summary(self) -> dict:
        return {"mode": "auto", "depth": self.current,
                "conditional_acceptance": [round(r, 4) for r in self.conditional()],
                "round_ms": {k: round(v * 1e3, 3) for k, v in sorted(self.time.items())}}


class BatchDepth:
    """Auto depth per batch size. In a batch every sequence pays for all the others' verify
    rows, so what pays at 1 stream may not at 16: acceptance and round time are learned per
    bucket of active sequences, and depth 0 (no draft) is a choice."""
    BUCKETS = (1, 2, 4, 8, 16, 32)

    def __init__(self, max_depth: int = 4):
        self.max_depth = max_depth
        self.policies: dict[int, AutoDepth] = {}
        self.active = 1
        self.stages = 1

    def bucket(self, active: int) -> int:
        return max(b for b in self.BUCKETS if b <= max(active, 1))

    def current(self) -> AutoDepth:
        b = self.bucket(self.active)
        if b not in self.policies:
            self.policies[b] = AutoDepth(self.max_depth, allow_plain=b > 1)
        self.policies[b].stages = self.stages
        return self.policies[b]

    def choose(self) -> int:
        return self.current().choose()

    def window(self) -> int:
        return self.current().window()

    def observe(self, depth: int, accepted: int, seconds: float | None, guessed: bool | None = None) -> None:
        self.current().observe(depth, accepted, seconds, guessed)

    def summary(self) -> dict:
        return {"mode": "auto", "by_active_sequences": {b: p.summary() for b, p in sorted(self.policies.items())}}


def rounds_window(setting: int, stages: int, active: int, policy: DepthPolicy | None = None) -> int:
    """Verify rounds one sequence may have in flight. With fewer sequences than stages, a
    stream's rounds fill the stages its own single round would leave idle; with more, the
    other sequences fill them and speculation on top of speculation only wastes rows. An
    automatic depth policy also weighs measured acceptance against the slots a void round costs."""
    if setting:
        return setting
    share = max(1, stages // max(active, 1))
    if share > 1 and hasattr(policy, "window"):
        policy.stages = share
        return max(1, min(share, policy.window()))
    return share


def make_policy(depth: int | str) -> DepthPolicy:
    """`--mtp-depth K` or `--mtp-depth auto`."""
    if depth == "auto":
        return AutoDepth()
    return FixedDepth(int(depth))


def parse_depth(text: str) -> int | str:
    """The value of an `--mtp-depth` flag: 1..8 or 'auto' (argparse type)."""
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--mtp-depth must be 1-8 or 'auto', not {text!r}") from None
    if not 1 <= k <= 8:
        raise ValueError(f"--mtp-depth must be 1-8 or 'auto', not {k}")
    return k
