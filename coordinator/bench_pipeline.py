"""Pipeline figures for `mtpdist bench --workers N`: the same model through local workers."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mtpdist.engine.driver import generate
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.sampling import SamplingParams
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings

from .local_cluster import LocalCluster
from .session import PipelineSession


def _run(session: PipelineSession, prompt_ids, max_tokens: int, mtp: bool):
    """One greedy request through the scheduler; its result and the overhead per unit (wall
    time less the workers' compute), and bytes sent."""
    sched = Scheduler(session.generator, session, SchedulerSettings(reuse_prefixes=False))
    sent0 = session.transport().sent_bytes
    r = generate(sched, GenerationRequest(tuple(prompt_ids), max_tokens, SamplingParams(), mtp=mtp, ignore_eos=True))
    st = sched.stats
    overhead_us = (st["unit_wall_s"] - st["unit_compute_s"]) / max(st["units_done"], 1) * 1e6
    return r, overhead_us, session.transport().sent_bytes - sent0


def pipeline_bench(model: str, prompt_ids, max_tokens: int, repeats: int, n_workers: int,
                   addresses: list[str] | None, single: dict) -> dict:
    """Plain and MTP through workers, with overhead per hop and bytes on the wire."""
    tmp = tempfile.TemporaryDirectory()
    cluster = None if addresses else LocalCluster(n_workers, Path(tmp.name))
    try:
        addrs = addresses or cluster.addresses
        session = PipelineSession(model, addrs, mtp=True, progress=False)
        tps = {"plain": [], "mtp": []}
        overhead, tok_bytes, acc = [], [], []
        for i in range(repeats + 1):
            for mtp in (False, True):
                r, over, sent = _run(session, prompt_ids, max_tokens, mtp)
                if not i:
                    continue
                tps["mtp" if mtp else "plain"].append(r.generation_tps)
                if mtp:
                    acc.append(r.acceptance)
                else:
                    overhead.append(over)
                    tok_bytes.append(sent / max(r.generation_tokens + len(prompt_ids), 1))
        memory = _worker_memory(cluster, session) if cluster else None
        session.close()
    finally:
        if cluster:
            cluster.stop()
        tmp.cleanup()
    med = {k: round(statistics.median(v), 3) for k, v in tps.items() if v}
    out = {
        "workers": len(addrs),
        "tps_median": med,
        "pipeline_efficiency": round(med["plain"] / single["plain"], 4),
        "overhead_per_forward_us": round(statistics.median(overhead)),
        "overhead_per_stage_us": round(statistics.median(overhead) / len(addrs)),
        "activation_bytes_per_token": round(statistics.median(tok_bytes)),
        "mtp_speedup_pipeline": round(med["mtp"] / med["plain"], 4),
        "mtp_speedup_single": round(single["mtp"] / single["plain"], 4),
        "acceptance": round(statistics.median(acc), 4) if acc else None,
    }
    out["mtp_speedup_ratio"] = round(out["mtp_speedup_pipeline"] / out["mtp_speedup_single"], 4)
    if memory:
        out["worker_memory"] = memory
    return out


def add_pipeline_figures(result: dict, args, prompt_ids) -> None:
    """`mtpdist bench --workers N`: the same model through workers, added to the single-process result."""
    med = result["tps_median"]
    single = {"plain": med["plain"], "mtp": med.get("mtp", med["plain"])}
    result["pipeline"] = pipeline_bench(args.model, prompt_ids, args.max_tokens, args.repeats,
                                        args.workers, args.worker, single)
    if not args.skip_mlx_lm:
        result["pipeline"]["mlx_lm_ring"] = mlx_lm_ring_pipeline(args.model, prompt_ids, args.max_tokens,
                                                                 args.repeats, result["pipeline"]["workers"])


def _worker_memory(cluster, session) -> list[dict]:
    """Each local worker's peak resident memory next to the bytes of the layers it holds."""
    out = []
    for w, info in zip(cluster.workers, session.infos):
        try:
            status = Path(f"/proc/{w.proc.pid}/status").read_text()
        except OSError:
            return []
        kib = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(("VmHWM", "VmRSS"))}
        out.append({"layers": [info.layer_start, info.layer_end], "shard_mib": round(info.weight_bytes / 2**20, 1),
                    "peak_rss_mib": round(kib.get("VmHWM", 0) / 1024, 1), "rss_mib": round(kib.get("VmRSS", 0) / 1024, 1)})
    return out


def mlx_lm_ring_pipeline(model: str, prompt_ids, max_tokens: int, repeats: int, ranks: int = 2) -> dict:
    """mlx-lm's own pipeline under `mlx.launch --backend ring`, or why it could not run."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--backend", "ring", "-n", str(ranks), "--starting-port", "52500", sys.executable,
           "-m", "mtpdist.coordinator.peer_mlx_lm_pipeline", model, json.dumps(list(prompt_ids)), str(max_tokens), str(repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e), "command": " ".join(cmd)}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    tail = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip() and "Socket" not in ln][-3:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail), "command": " ".join(cmd)}
