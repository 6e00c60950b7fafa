"""What the scheduler works with: its settings, the protocols of its two sides (where output
goes, where layers run) and the record of each request it serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..model.cache import copy_caches
from .decoder import SequenceDecoder, Step
from .depth import DepthPolicy, FixedDepth
from .generate import Delta, GenerationRequest, Generator, Output
from .prefix_cache import PrefixEntry
from .recovery import Replay
from .sampling import Sampler
from .transport import Transport


class Sink(Protocol):
    """Where a request's output goes: Deltas, then an exception or None at the end."""
    def emit(self, item: Delta | Exception | None) -> None: ...
    def cancelled(self) -> bool: ...


class Backend(Protocol):
    """The layers' side: the current transport, membership changes, recovery."""
    def transport(self) -> Transport: ...
    def prepare(self) -> None: ...
    def recover(self) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    """Limits of the scheduler."""
    max_inflight: int = 0            # units in flight; 0 = one per stage
    prefill_budget: int = 512        # prefill rows per unit
    max_unit_sequences: int = 64
    max_recoveries: int = 3          # consecutive failed recoveries before giving up
    reuse_prefixes: bool = True      # keep finished turns and prompts; continue later requests from them
    prefix_min_tokens: int = 16      # shorter prompts are not worth keeping
    prefix_capacity: int = 64
    prefix_max_bytes: int = 2 << 30  # the coordinator's copies of kept MTP-head caches
    rounds_in_flight: int = 0        # verify rounds of one sequence in flight; 0 = chosen per load


def make_decoder(generator: Generator, req: GenerationRequest, auto_depth: DepthPolicy,
                 entry: PrefixEntry | None) -> SequenceDecoder:
    """A request's decoder, from scratch or continuing a kept prefix (`entry`) the workers forked;
    "auto" depth requests share `auto_depth`."""
    depth = None
    if req.mtp and generator.make_depth is not None:
        depth = generator.make_depth(req)
    elif req.mtp:
        depth = auto_depth if req.mtp_depth == "auto" else FixedDepth(int(req.mtp_depth))
    drafter = generator.drafter(req)
    if entry is not None and drafter is not None:
        drafter.caches = copy_caches(entry.mtp_caches)
    decoder = SequenceDecoder(generator.parts.head, Sampler(req.sampling), req.prompt_ids, drafter, depth,
                              generator.prefill_step, start=len(entry.tokens) if entry else 0,
                              boundaries=req.boundaries)
    decoder.logprobs_top = req.logprobs
    return decoder


class UnitStats(dict):
    """Counters of the units sent and back (a dict: benchmarks read them by name)."""

    def __init__(self):
        super().__init__(dict.fromkeys(("units", "unit_sequences", "max_unit_sequences", "max_stage_rows",
                                        "units_done"), 0), unit_wall_s=0.0, unit_compute_s=0.0)

    def sent(self, sequences: int) -> None:
        self["units"] += 1
        self["unit_sequences"] += sequences
        self["max_unit_sequences"] = max(self["max_unit_sequences"], sequences)

    def back(self, result, wall: float) -> None:
        self["max_stage_rows"] = max(self["max_stage_rows"], *result.batch_rows, 0)
        self["unit_wall_s"] += wall
        self["unit_compute_s"] += sum(result.compute_us) / 1e6
        self["units_done"] += 1


@dataclass
class LiveSequence:
    """A request the scheduler is serving: its decoder, output, replay log and workers' id."""
    key: str
    req: GenerationRequest
    sink: Sink
    order: int
    decoder: SequenceDecoder | None = None      # None while its kept prefix is being forked
    output: Output | None = None
    log: list[Step] = field(default_factory=list)  # confirmed steps from position 0, for exact replay
    inflight: int = 0
    ended: bool = False
    inherited: int = 0               # leading steps of `log` that built the kept state it started from
    keep_at: dict[int, str] = field(default_factory=dict)  # prompt positions to keep state at -> names
    kept: bool = False               # its state was kept for reuse instead of released
    wire_id: str = ""                # the sequence's id on the workers (new after each recovery)
    replay: Replay | None = None
    early: dict = field(default_factory=dict)   # rounds back before an older one of the same sequence
    keep_turn: bool = False          # keep its state for the next turn once no round is in flight

    def __post_init__(self):
        self.wire_id = self.wire_id or self.key

    def draft_ahead(self) -> bool:
        """One more draft of its next stacked round, if its window is full (False: none to make)."""
        return not self.ended and self.decoder is not None and self.replay is None and self.decoder.draft_ahead()

    def replay_log(self, upto: int | None = None) -> list[Step]:
        """The steps that rebuild this sequence's state from position 0 (only those ending by
        `upto`): the inherited ones, then its own in the order they were sent. Their epochs are
        those they were sent under; `recovery.renumber` gives a replay its own."""
        own = sorted(self.log[self.inherited:], key=lambda st: (st.position, st.index))
        if upto is not None:
            own = [st for st in own if st.position + len(st.tokens) <= upto]
        return self.log[:self.inherited] + own

