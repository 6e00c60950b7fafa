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


def plan_layers(usable: list[int], layer_bytes: list[int], headroom: float = 0.1) -> Placement:
    """Split layers into contiguous ranges proportional to each worker's usable memory.

    `headroom` is the fraction of each worker's memory kept free for KV and GDN state.
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
    # Each boundary goes where the running byte total is nearest that worker's cumulative
    # share, leaving at least one layer for every worker.
    cum = [0]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
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


def _arith(total, usable, cap, headroom, used=None) -> str:
    def gb(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 or b == 0 else f"{b / 2**20:.1f} MiB"
    lines = [f"the model's layers need {gb(total)}; workers offer {gb(sum(cap))} "
             f"after keeping {headroom:.0%} for KV/state:"]
    for i, (u, c) in enumerate(zip(usable, cap)):
        extra = f", would hold {gb(used[i])}" if used else ""
        lines.append(f"  worker {i}: {gb(u)} usable -> {gb(c)} for weights{extra}")
    return "\n".join(lines)
