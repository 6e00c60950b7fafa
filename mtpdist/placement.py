"""Placement: which contiguous layers each worker holds. Pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """The model does not fit; the message carries the arithmetic."""


@dataclass(frozen=True)
class Placement:
    """Contiguous layer ranges per worker and the bytes each will hold."""
    ranges: tuple[tuple[int, int], ...]     # [start, end) per worker, in pipeline order
    bytes_per_worker: tuple[int, ...]


def plan_layers(usable: list[int], layer_bytes: list[int], headroom: float = 0.1,
                speed: list[float] | None = None) -> Placement:
    """Split layers into contiguous ranges, one per worker, in pipeline order.

    Without `speed`, ranges are proportional to each worker's usable memory. With `speed`
    (bytes of weights each worker reads per second), the ranges minimise the slowest
    stage's time, since once stages overlap the slowest one sets the pace, within each
    worker's memory. `headroom` is the fraction of memory kept free for KV and GDN state.
    Every worker gets at least one layer. Refuses (with the arithmetic) if it cannot fit.
    """
    n, L = len(usable), len(layer_bytes)
    if n == 0:
        raise PlacementError("no workers to place layers on")
    if L < n:
        raise PlacementError(f"{L} layers cannot be split across {n} workers (at least one layer each)")
    cap = [int(u * (1 - headroom)) for u in usable]
    total = sum(layer_bytes)
    if total > sum(cap):
        raise PlacementError(_arith(total, usable, cap, headroom))
    cum = [0]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
    if speed is not None and len(speed) == n and all(s > 0 for s in speed):
        ranges = _balanced(cap, cum, speed)
        if ranges is None:
            raise PlacementError(_arith(total, usable, cap, headroom))
        return Placement(tuple(ranges), tuple(cum[e] - cum[s] for s, e in ranges))
    # Each boundary goes where the running byte total is nearest that worker's cumulative
    # share, leaving at least one layer for every worker.
    ranges, start, target = [], 0, 0.0
    for i in range(n - 1):
        target += cap[i] / sum(cap) * total
        end = min(range(start + 1, L - (n - 1 - i) + 1), key=lambda k: abs(cum[k] - target))
        ranges.append((start, end))
        start = end
    ranges.append((start, L))
    used = [sum(layer_bytes[s:e]) for s, e in ranges]
    if any(u > c for u, c in zip(used, cap)):
        raise PlacementError(_arith(total, usable, cap, headroom, used))
    return Placement(tuple(ranges), tuple(used))


def _balanced(cap: list[int], cum: list[int], speed: list[float]) -> list[tuple[int, int]] | None:
    """Contiguous ranges minimising max(bytes_i / speed_i) with bytes_i <= cap_i (dynamic programming)."""
    n, L, inf = len(cap), len(cum) - 1, float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]   # best[i][e]: workers < i hold layers < e
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(1, n + 1):
        for e in range(i, L - (n - i) + 1):
            for k in range(i - 1, e):
                size = cum[e] - cum[k]
                if best[i - 1][k] == inf or size > cap[i - 1]:
                    continue
                t = max(best[i - 1][k], size / speed[i - 1])
                if t < best[i][e]:
                    best[i][e], cut[i][e] = t, k
    if best[n][L] == inf:
        return None
    ranges, e = [], L
    for i in range(n, 0, -1):
        ranges.append((cut[i][e], e))
        e = cut[i][e]
    return ranges[::-1]


def keep_held(new: Placement, held: list[tuple[int, int]], usable: list[int], layer_bytes: list[int],
              headroom: float = 0.1, speed: list[float] | None = None, slack: float = 0.15) -> Placement:
    """The ranges the workers already hold, when they cover the model in order, fit, and their
    slowest stage is within `slack` of `new`'s; else `new`. A restarted coordinator then keeps
    loaded shards instead of re-sending weights over a plan that differs only by measurement noise."""
    L, n = len(layer_bytes), len(usable)
    if len(held) != n or not held or held[0][0] != 0 or held[-1][1] != L:
        return new
    if any(s >= e for s, e in held) or any(a[1] != b[0] for a, b in zip(held, held[1:])):
        return new
    sizes = [sum(layer_bytes[s:e]) for s, e in held]
    if any(b > int(u * (1 - headroom)) for b, u in zip(sizes, usable)):
        return new
    rate = speed if speed is not None and len(speed) == n and all(x > 0 for x in speed) else [1.0] * n
    slowest = max(b / r for b, r in zip(sizes, rate))
    if slowest > (1 + slack) * max(b / r for b, r in zip(new.bytes_per_worker, rate)):
        return new
    return Placement(tuple(held), tuple(sizes))


def stage_seconds(placement: Placement, speed: list[float]) -> list[float]:
    """Estimated time of each stage's weight reads per forward."""
    return [b / s for b, s in zip(placement.bytes_per_worker, speed)]


def _arith(total, usable, cap, headroom, used=None) -> str:
    def gb(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 or b == 0 else f"{b / 2**20:.1f} MiB"
    lines = [f"the model's layers need {gb(total)}; workers offer {gb(sum(cap))} "
             f"after keeping {headroom:.0%} for KV/state:"]
    for i, (u, c) in enumerate(zip(usable, cap)):
        extra = f", would hold {gb(used[i])}" if used else ""
        lines.append(f"  worker {i}: {gb(u)} usable -> {gb(c)} for weights{extra}")
    return "\n".join(lines)


# A worker offers this share of its machine's RAM unless told otherwise; workers of one
# machine together get no more than this share (or the largest single offer, when one was
# given explicitly as more).
HOST_SHARE = 0.75


def share_host_budgets(usable: list[int], hosts: list[str], memory: list[int], share: float = HOST_SHARE) -> list[int]:
    """Each worker's usable bytes once workers on one machine share its budget.

    Workers with the same non-empty host id run on one machine with `memory` bytes of RAM.
    Together they may use the sum of their offers, but no more than `share` of the RAM (or
    the largest single offer, if that is more): two workers started without a memory flag
    (each offering 75% of RAM) get half of that 75% each, in proportion to their offers.
    Workers without a host id are on machines of their own.
    """
    out = list(usable)
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hosts):
        if h:
            groups.setdefault(h, []).append(i)
    for members in groups.values():
        total = sum(usable[i] for i in members)
        ram = max(memory[i] for i in members)
        cap = min(total, max(max(usable[i] for i in members), int(ram * share))) if ram else total
        if cap < total:
            for i in members:
                out[i] = usable[i] * cap // total
    return out
