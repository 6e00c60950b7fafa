"""`mtpdist bench --scenario ...`: the scheduler through local workers, as JSON.

Scenarios (each run side by side in one process, repeated and interleaved, medians kept):
- `streams`: aggregate tok/s of 1..N concurrent streams, MTP off and on.
- `depths`: one stream at plain, depth 1..K and auto, with acceptance by depth.
- `prefill`: time to first token of a long prompt, chunks pipelined vs one after another.
- `hop`: time per forward outside worker compute, per stage (no emulation).
- `chat`: a long prompt's continuation sent as token ids (a /v1/completions client), from the
  kept state or afresh; `agent` (coordinator/bench_agent.py): chats as chat clients send them.
Workers may emulate Mac-speed stages (`--emulate-ms A,B`, figures then say "emulated") and
may be pinned to their own CPU cores (`--pin`).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from mtpdist import __version__
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.driver import run_all
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.errors import MtpdistError
from mtpdist.wire.client import ChannelSettings

from .local_cluster import LocalCluster
from .local_session import LocalSession
from .session import PipelineSession

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def read_json(path):\n    with open(path) as f:\n",
    "# Sort a list of numbers\ndef sort_numbers(xs):\n",
    "def is_prime(n):\n",
    "def merge(a, b):\n    \"\"\"Merge two sorted lists.\"\"\"\n",
    "for i in range(10):\n",
]


def core_sets(n_workers: int, per: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """`per` cores for this process and for each worker, none shared (like separate Macs)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < per * (n_workers + 1):
        raise MtpdistError(f"--pin-cores {per} with {n_workers} workers needs {per * (n_workers + 1)} cores; "
                           f"this machine has {len(cores)}")
    sets = [tuple(cores[i * per:(i + 1) * per]) for i in range(n_workers + 1)]
    return sets[0], sets[1:]


class Bench:
    """A session over local workers (or in-process layers with 0 workers) and its settings."""

    def __init__(self, args, tmp: Path, make_transport=None):
        self.args = args
        # Local workers read the same folder (no streaming); emulation makes them Mac-speed stages.
        extra = ("--model-dir", str(Path(args.model).resolve()),
                 *(("--emulate-ms", args.emulate_ms) if args.emulate_ms else ()))
        self.cluster = None
        self.pinned = None
        theirs = None
        if args.pin_cores:
            mine, theirs = core_sets(args.workers, args.pin_cores)
            os.sched_setaffinity(0, mine)
            self.pinned = {"coordinator": list(mine), "workers": [list(c) for c in theirs]}
        if args.workers:
            gpus = [g.strip() for g in args.worker_gpus.split(",")] if getattr(args, "worker_gpus", None) else None
            self.cluster = LocalCluster(args.workers, tmp, *extra, cpus=theirs, gpus=gpus)
            # Real compute on a CPU can be slow: generous step deadlines.
            self.session = PipelineSession(args.model, self.cluster.addresses, mtp=True, progress=False,
                                           prefill_step=args.prefill_step, channel=ChannelSettings(step_timeout=120))
        else:
            self.session = LocalSession(args.model, make_transport, mtp=True, prefill_step=args.prefill_step)
        self.prompts = [self.session.generator.encode(p) for p in PROMPTS]

    def scheduler(self, max_inflight: int = 0, reuse: bool = True, rounds: int = 0) -> Scheduler:
        """A scheduler over this session with the bench's settings."""
        return Scheduler(self.session.generator, self.session,
                         SchedulerSettings(max_inflight=max_inflight, prefill_budget=self.args.prefill_step,
                                           reuse_prefixes=reuse, rounds_in_flight=rounds))

    def run(self, reqs, max_inflight: int = 0, stagger: float = 0.0, reuse: bool = True, rounds: int = 0,
            sched: Scheduler | None = None):
        """Run requests on `sched` (default: a fresh scheduler): (results, wall seconds, the scheduler)."""
        sched = sched or self.scheduler(max_inflight, reuse, rounds)
        t0 = time.perf_counter()
        sinks = run_all(sched, reqs, timeout=1800, stagger=stagger)
        wall = time.perf_counter() - t0
        return [s.wait() for s in sinks], wall, sched

    def close(self) -> None:
        self.session.close() if hasattr(self.session, "close") else None
        if self.cluster:
            self.cluster.stop()


def _req(b: Bench, i: int, mode: str) -> GenerationRequest:
    mtp = mode != "plain"
    return GenerationRequest(tuple(b.prompts[i % len(b.prompts)]), b.args.max_tokens, mtp=mtp,
                             mtp_depth=(mode if mode == "auto" else int(mode)) if mtp else 1)


def scenario_streams(b: Bench) -> dict:
    counts = [int(x) for x in b.args.streams.split(",")]
    modes = ["plain"] + ([] if b.args.mtp_depth == "none" else [str(b.args.mtp_depth)])
    runs: dict[str, list[float]] = {}
    acc: dict[str, list[float]] = {}
    # One scheduler per mode for the whole run, as a server keeps one: the automatic depth learns
    # in the warm-up round, not again in every measured one. No prefix reuse: the prompts repeat.
    scheds = {mode: b.scheduler(reuse=False) for mode in modes}
    for rep in range(b.args.repeats + 1):       # the first round warms up and is dropped
        for n in counts:
            for mode in modes:
                results, wall, _ = b.run([_req(b, i, mode) for i in range(n)], sched=scheds[mode])
                if rep:
                    key = f"{mode}:{n}"
                    runs.setdefault(key, []).append(sum(r.generation_tokens for r in results) / wall)
                    if mode != "plain":
                        acc.setdefault(key, []).append(statistics.mean(r.acceptance for r in results))
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    out = {"aggregate_tps": med, "acceptance": {k: round(statistics.median(v), 4) for k, v in acc.items()}}
    for mode in modes:
        one = med[f"{mode}:{counts[0]}"]
        out[f"{'mtp' if mode != 'plain' else 'plain'}_scaling_vs_{counts[0]}_stream"] = {
            str(n): round(med[f"{mode}:{n}"] / one, 3) for n in counts}
    if len(modes) > 1:
        out["mtp_over_plain"] = {str(n): round(med[f"{modes[1]}:{n}"] / med[f"plain:{n}"], 3) for n in counts}
    return out


def scenario_depths(b: Bench) -> dict:
    modes = ["plain", *[str(k) for k in range(1, b.args.max_depth + 1)], "auto"]
    runs: dict[str, list[float]] = {}
    by_depth: dict[str, list] = {}
    for rep in range(b.args.repeats + 1):
        for mode in modes:
            # One stream: each prompt alone, one after another, on one scheduler (auto keeps learning).
            sched = Scheduler(b.session.generator, b.session,
                              SchedulerSettings(prefill_budget=b.args.prefill_step, reuse_prefixes=False))
            results = [run_all(sched, [_req(b, i, mode)], timeout=1800)[0].wait() for i in range(len(b.prompts))]
            if not rep:
                continue
            runs.setdefault(mode, []).append(statistics.mean(r.generation_tps for r in results))
            if mode != "plain":
                tried = [sum(1 for r in results if len(r.acceptance_by_depth) > j) for j in range(8)]
                by_depth.setdefault(mode, []).append([round(statistics.mean(
                    r.acceptance_by_depth[j] for r in results if len(r.acceptance_by_depth) > j), 4)
                    for j in range(8) if tried[j]])
                if mode == "auto":
                    by_depth.setdefault("auto_policy", []).append(sched.auto_depth.summary())
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    return {"tps": med, "over_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
            "acceptance_by_depth_cumulative": {k: v[-1] for k, v in by_depth.items()}}


def scenario_prefill(b: Bench) -> dict:
    base = [t for p in b.prompts for t in p]
    prompt = tuple((base * (b.args.prompt_tokens // len(base) + 1))[:b.args.prompt_tokens])
    runs: dict[str, list[float]] = {"pipelined": [], "one_after_another": []}
    for rep in range(b.args.repeats + 1):
        for name, inflight in (("pipelined", 0), ("one_after_another", 1)):
            results, _, _ = b.run([GenerationRequest(prompt, 2)], max_inflight=inflight)
            if rep:
                runs[name].append(results[0].time_to_first_token)
        if rep:  # a 4-token request arriving a second into the long prefill
            results, _, _ = b.run([GenerationRequest(prompt, 2), GenerationRequest(tuple(b.prompts[5][:4]), 2)],
                                  stagger=1.0)
            runs.setdefault("short_request_during_prefill", []).append(results[1].time_to_first_token)
    med = {k: round(statistics.median(v), 4) for k, v in runs.items()}
    return {"prompt_tokens": len(prompt), "chunk": b.args.prefill_step, "ttft_s": med,
            "pipelined_over_one_after_another": round(med["pipelined"] / med["one_after_another"], 4)}


def scenario_interleave(b: Bench) -> dict:
    """A 4-token request arriving a second into a long prompt's prefill: both first tokens."""
    base = [t for p in b.prompts for t in p]
    prompt = tuple((base * (b.args.prompt_tokens // len(base) + 1))[:b.args.prompt_tokens])
    short = tuple(b.prompts[5][:4])
    b.run([GenerationRequest(short, 2)])                          # warm up
    results, _, _ = b.run([GenerationRequest(prompt, 2), GenerationRequest(short, 2)], stagger=1.0)
    alone, _, _ = b.run([GenerationRequest(short, 2)])
    return {"prompt_tokens": len(prompt), "chunk": b.args.prefill_step,
            "ttft_s": {"long_prompt": round(results[0].time_to_first_token, 4),
                       "short_request_during_prefill": round(results[1].time_to_first_token, 4),
                       "short_request_alone": round(alone[0].time_to_first_token, 4)}}


def scenario_chat(b: Bench) -> dict:
    """Two turns of a chat with a long history: the second turn's time to first token when it
    continues from the first turn's kept state, and when it is prefilled afresh."""
    base = [t for p in b.prompts for t in p]
    history = tuple((base * (b.args.prompt_tokens // len(base) + 1))[:b.args.prompt_tokens])
    follow = tuple(b.prompts[1])
    runs: dict[str, list[float]] = {"first_turn": [], "second_turn_reused": [], "second_turn_fresh": []}
    for rep in range(b.args.repeats + 1):
        history = (rep + 1,) + history[1:]                         # a new chat each round
        results, _, sched = b.run([GenerationRequest(history, b.args.max_tokens)])
        second = GenerationRequest(history + results[0].token_ids + follow, 4)
        reused = run_all(sched, [second], timeout=1800)[0].wait()
        fresh, _, _ = b.run([second], reuse=False)
        if rep:
            runs["first_turn"].append(results[0].time_to_first_token)
            runs["second_turn_reused"].append(reused.time_to_first_token)
            runs["second_turn_fresh"].append(fresh[0].time_to_first_token)
        assert reused.token_ids == fresh[0].token_ids, "reuse changed the output"
    med = {k: round(statistics.median(v), 4) for k, v in runs.items()}
    return {"history_tokens": len(history), "ttft_s": med,
            "second_over_first": round(med["second_turn_reused"] / med["first_turn"], 4),
            "cached_tokens": reused.cached_tokens}


def scenario_hop(b: Bench) -> dict:
    per_stage = []
    for rep in range(b.args.repeats + 1):
        _, _, sched = b.run([_req(b, 0, "plain")], max_inflight=1)
        st = sched.stats
        if rep and st["units_done"]:
            per_stage.append((st["unit_wall_s"] - st["unit_compute_s"]) / st["units_done"] / max(b.args.workers, 1))
    return {"overhead_per_stage_us": round(statistics.median(per_stage) * 1e6, 1),
            "runs_us": [round(x * 1e6, 1) for x in per_stage]}


SCENARIOS = {"streams": scenario_streams, "depths": scenario_depths, "prefill": scenario_prefill,
             "interleave": scenario_interleave,
             "hop": scenario_hop, "chat": scenario_chat}


def run_scenario(args, make_transport) -> dict:
    """Run `args.scenario` and return its JSON-ready figures with the settings behind them."""
    if args.repeats < 1:
        raise MtpdistError("--repeats must be at least 1 (a warm-up round runs first and is dropped)")
    b = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.scenario == "agent":
            from .bench_agent import scenario_agent
            figures = scenario_agent(args, Path(tmp))
        elif args.scenario == "macs":
            from .bench_macs import scenario_macs
            figures = scenario_macs(args, Path(tmp))
        else:
            b = Bench(args, Path(tmp), make_transport)
            try:
                figures = SCENARIOS[args.scenario](b)
            finally:
                b.close()
    return {"scenario": args.scenario, "mtpdist_version": __version__, "machine": platform.platform(),
            "model": str(Path(args.model).resolve()), "workers": args.workers,
            "emulated": f"emulated, {args.emulate_ms}" if args.emulate_ms else "real compute",
            "pinned": b.pinned if b else None, "max_tokens": args.max_tokens, "prefill_step": args.prefill_step,
            "repeats": args.repeats, **figures}
