"""Which sequences' steps to send next, and how to group them: a pure function over plain state.

A unit is one Forward through the pipeline carrying several sequences' rows. With N stages,
about N units in flight keep every stage busy: each unit holds a share of the active
sequences, so the groups spread over the stages instead of moving as one block. Decode and
verify steps go first (they are short and a user waits on each); prefill rows fill a
per-unit token budget, shortest remaining prompt first, so a short request is not stuck
behind a long one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A sequence that can send a step now."""
    key: str
    kind: str             # "prefill" | "decode" | "verify"
    rows: int             # rows it would send (for prefill: its next chunk)
    order: int            # arrival order (older first)
    remaining: int = 0    # prompt rows still to prefill


@dataclass(frozen=True)
class PlanLimits:
    """How much to keep in flight."""
    stages: int                  # pipeline depth
    max_inflight: int            # units in flight at once (default: one per stage)
    prefill_budget: int = 512    # prefill rows per unit (decode/verify rows come on top)
    max_unit_sequences: int = 64


def plan_units(candidates: list[Candidate], inflight: int, active: int,
               limits: PlanLimits) -> list[list[tuple[str, int]]]:
    """Units to send now, each a list of (key, rows). A key appears at most once."""
    free = limits.max_inflight - inflight
    if free <= 0 or not candidates:
        return []
    share = -(-max(active, 1) // max(limits.stages, 1))           # ceil(active / stages)
    per_unit = max(1, min(share, limits.max_unit_sequences))
    steps = sorted((c for c in candidates if c.kind != "prefill"), key=lambda c: c.order)
    prefills = sorted((c for c in candidates if c.kind == "prefill"), key=lambda c: (c.remaining, c.order))
    units: list[list[tuple[str, int]]] = []
    while free > 0 and (steps or prefills):
        unit: list[tuple[str, int]] = []
        while steps and len(unit) < per_unit:
            c = steps.pop(0)
            unit.append((c.key, c.rows))
        budget = limits.prefill_budget
        while len(unit) < per_unit:   # whole chunks only: where a chunk ends never depends on load
            c = next((c for c in prefills if c.rows <= budget), None)
            if c is None:
                break
            prefills.remove(c)
            unit.append((c.key, c.rows))
            budget -= c.rows
        units.append(unit)
        free -= 1
    return units
