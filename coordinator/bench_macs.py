"""`mtpdist bench --scenario macs`: is one stream faster on N Macs than on one?

For each worker count N (`--worker-counts 1,2,4`), N local workers each emulate 1/N of a Mac
(`--emulate-ms A,B` is the whole Mac; each worker gets A/N, B/N) and one greedy stream runs
plain, with MTP one round at a time (as before rounds in flight), and with MTP and verify
rounds in flight (auto depth, and each fixed depth up to `--max-depth`). Runs are interleaved
(their order reversed every repeat) and repeated, medians kept; the first repeat warms up and
is dropped. With the largest N,
`--streams` concurrent streams (the last count given) also run with and without speculative
rounds, to show that speculation backs off when the stages are already full. Each mode keeps
one scheduler across its repeats, as a server does: the automatic depth policy has learned
from the warm-up repeat when the measured ones run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

from mtpdist.engine.generate import GenerationRequest
from mtpdist.errors import MtpdistError

from .bench_streams import Bench


def _modes(n: int, max_depth: int) -> list[tuple[str, int | str | None, int]]:
    """(name, MTP depth or None for plain, rounds in flight: 0 = auto)."""
    modes = [("plain", None, 1), ("mtp_auto", "auto", 1)] + [(f"mtp_{k}", k, 1) for k in range(1, max_depth + 1)]
    if n > 1:
        modes += [("mtp_auto_rounds", "auto", 0)] + [(f"mtp_{k}_rounds", k, 0) for k in range(1, max_depth + 1)]
    return modes


def _scaled(emulate: str, n: int) -> str:
    a, b = (float(x) for x in emulate.split(","))
    return f"{a / n:g},{b / n:g}"


def scenario_macs(args, tmp: Path) -> dict:
    if not args.emulate_ms:
        raise MtpdistError("--scenario macs needs --emulate-ms A,B (the whole Mac; N workers get A/N,B/N each)")
    counts = [int(x) for x in args.worker_counts.split(",")]
    streams = int(str(args.streams).split(",")[-1])
    out: dict = {"emulated_whole_mac": f"emulated, {args.emulate_ms}", "per_worker_count": {}}
    for n in counts:
        b = Bench(SimpleNamespace(**{**vars(args), "workers": n, "emulate_ms": _scaled(args.emulate_ms, n),
                                     "pin_cores": 0}), tmp / f"n{n}")
        try:
            out["per_worker_count"][str(n)] = _one_count(b, n, args, streams if n == counts[-1] else 0)
        finally:
            b.close()
    per = out["per_worker_count"]
    base = per[str(counts[0])]
    best1 = max(v for k, v in base["tps"].items() if k != "plain")
    for n in counts[1:]:
        p = per[str(n)]
        out[f"{n}_workers_over_{counts[0]}"] = {
            "best_mtp": round(max(v for k, v in p["tps"].items() if k != "plain") / best1, 3),
            "mtp_auto_rounds_over_mtp_auto": round(p["tps"]["mtp_auto_rounds"] / base["tps"]["mtp_auto"], 3)}
    return out


def _one_count(b: Bench, n: int, args, streams: int) -> dict:
    prompt = tuple(b.prompts[0])
    runs: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    modes = _modes(n, args.max_depth)
    scheds = {name: b.scheduler(reuse=False, rounds=rounds) for name, _, rounds in modes}
    for rep in range(args.repeats + 1):
        for name, depth, rounds in (modes if rep % 2 else modes[::-1]):   # order swapped every repeat
            req = GenerationRequest(prompt, args.max_tokens, mtp=depth is not None, mtp_depth=depth or 1,
                                    ignore_eos=True)
            results, wall, _ = b.run([req], sched=scheds[name])
            r = results[0]
            if rep:
                runs.setdefault(name, []).append(r.generation_tps)
                info[name] = {"acceptance": round(r.acceptance, 4), "rounds": r.rounds}
    tps = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    res = {"worker_emulation": f"emulated, {b.args.emulate_ms}", "tps": tps, "last_run": info,
           "mtp_auto_over_plain": round(tps["mtp_auto"] / tps["plain"], 3)}
    if "mtp_auto_rounds" in tps:
        res["mtp_auto_rounds_over_plain"] = round(tps["mtp_auto_rounds"] / tps["plain"], 3)
    if streams > 1:
        agg = {}
        many = {rounds: b.scheduler(reuse=False, rounds=rounds) for rounds in (1, 0)}
        for rep in range(args.repeats + 1):
            for rounds in ((1, 0) if rep % 2 else (0, 1)):
                reqs = [GenerationRequest(tuple(b.prompts[i % len(b.prompts)]), args.max_tokens, mtp=True,
                                          mtp_depth="auto", ignore_eos=True) for i in range(streams)]
                results, wall, _ = b.run(reqs, sched=many[rounds])
                if rep:
                    agg.setdefault("rounds_auto" if rounds == 0 else "rounds_1", []).append(
                        sum(r.generation_tokens for r in results) / wall)
        res[f"{streams}_streams_tps"] = {k: round(statistics.median(v), 3) for k, v in agg.items()}
    return res
