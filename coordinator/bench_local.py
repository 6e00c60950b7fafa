"""`mtpdist bench`: plain vs MTP decoding vs mlx-lm on one checkpoint, side by side.

Runs are interleaved (mlx-lm, plain, MTP, repeat) and the median taken, because the
machine is shared and noisy: ratios from one run mean more than absolute figures.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mtpdist import __version__
from mtpdist.engine.driver import generate
from mtpdist.engine.drafter import MTPDrafter
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.sampling import SamplingParams
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.model.cache import forget_all, rewind_all

from .local_session import LocalSession


def mlx_lm_tps(model, tokenizer, prompt_ids, max_tokens) -> float:
    """Greedy decode rate of mlx-lm's own stream_generate, timed from the first token."""
    from mlx_lm import stream_generate
    t_first = t_last = None
    n = 0
    for _ in stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens):
        t_last = time.perf_counter()
        t_first = t_first or t_last
        n += 1
    return (n - 1) / (t_last - t_first) if n > 1 else 0.0


def timed(fn, n: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over n calls (fn must eval what it computes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def pass_costs(session: LocalSession, prompt_ids, cycles: int) -> dict:
    """Milliseconds of one plain step, one 2-token verify pass and one MTP draft (model passes
    alone, no scheduling: what the cost model's A, verify and draft terms stand for)."""
    head, stack = session.parts.head, session.parts.stack
    caches = stack.make_caches()
    drafter = MTPDrafter(head, session.parts.mtp) if session.parts.mtp is not None else None

    def run(tokens, snapshots=()):
        forget_all(caches, caches[0].offset)    # a long timing loop must not pile up snapshots
        h = stack.ragged(head.embed(mx.array([list(tokens)])), [(caches, len(tokens), tuple(snapshots))])
        return h, head.norm(h)
    for s in range(0, len(prompt_ids) - 1, 512):
        mx.eval(run(prompt_ids[s:min(s + 512, len(prompt_ids) - 1)])[0])
    tok = prompt_ids[-1]

    def step():
        _, n = run([tok])
        mx.eval(mx.argmax(head.logits(n[0, -1])))

    def verify():
        _, n = run([tok, tok], snapshots=(1,))
        mx.eval(mx.argmax(head.logits(n[0]), axis=-1))
        rewind_all(caches, 1)

    out = {"step_ms": timed(step, cycles), "verify_ms": timed(verify, cycles)}
    if drafter is not None:
        h, n = run([tok])
        mx.eval(h, n)
        out["draft_ms"] = timed(lambda: mx.eval(mx.argmax(drafter.extend(h, n, [tok]))), cycles)
        s = out["step_ms"]
        out["verify_over_step"] = out["verify_ms"] / s
        out["draft_over_step"] = out["draft_ms"] / s
        out["cycle_over_step"] = (out["verify_ms"] + out["draft_ms"]) / s
        # Tokens per cycle are 1 + acceptance; a cycle costs cycle_over_step plain steps.
        out["predicted_speedup"] = {str(a): (1 + a) / out["cycle_over_step"] for a in (0.6, 0.8, 1.0)}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def run_bench(args, make_transport) -> dict:
    """`mtpdist bench`: interleaved runs of mlx-lm, plain and MTP in this process, as a dict
    (the CLI adds the figures through workers). `make_transport` builds the in-process stage."""
    has_mtp = True
    try:
        session = LocalSession(args.model, make_transport, mtp=True)
    except Exception:
        has_mtp = False
        session = LocalSession(args.model, make_transport, mtp=False)
    gen = session.generator
    prompt_ids = gen.encode(args.prompt)
    greedy = SamplingParams()
    ref = None
    if not args.skip_mlx_lm:
        from mlx_lm.utils import load as mlx_lm_load
        ref = mlx_lm_load(args.model)

    sched = Scheduler(gen, session, SchedulerSettings(reuse_prefixes=False))

    def ours(mtp: bool):
        return generate(sched, GenerationRequest(prompt_ids, args.max_tokens, greedy, mtp=mtp, ignore_eos=True))

    runs = {"mlx_lm": [], "plain": [], "mtp": []}
    acceptance = []
    tokens_equal = True
    for i in range(args.repeats + 1):  # the first round warms up and is dropped
        if ref is not None:
            tps = mlx_lm_tps(ref[0], ref[1], list(prompt_ids), args.max_tokens)
            if i:
                runs["mlx_lm"].append(tps)
        plain = ours(False)
        if i:
            runs["plain"].append(plain.generation_tps)
        if has_mtp:
            spec = ours(True)
            tokens_equal &= spec.token_ids == plain.token_ids
            if i:
                runs["mtp"].append(spec.generation_tps)
                acceptance.append(spec.acceptance)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    result = {
        "mtpdist_version": __version__, "mlx_version": mx.__version__, "device": str(mx.default_device()),
        "machine": platform.platform(), "model": str(Path(args.model).resolve()),
        "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens, "repeats": args.repeats,
        "tps_median": {k: round(v, 3) for k, v in med.items()},
        "tps_runs": {k: [round(x, 3) for x in v] for k, v in runs.items() if v},
    }
    if "mlx_lm" in med:
        result["plain_over_mlx_lm"] = round(med["plain"] / med["mlx_lm"], 4)
    if has_mtp:
        result["mtp_over_plain"] = round(med["mtp"] / med["plain"], 4)
        result["acceptance"] = round(statistics.median(acceptance), 4)
        result["mtp_tokens_equal_plain"] = bool(tokens_equal)
    result["pass_costs"] = pass_costs(session, prompt_ids, args.cycles)
    result["prompt_ids"] = list(prompt_ids)
    return result
