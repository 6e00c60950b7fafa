"""Pipeline figures for `mtpdist bench --workers N`: the same model through local workers."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.sampling import SamplingParams

from .local_cluster import LocalCluster
from .session import PipelineSession

MODES = {"chain+carry": (True, "carry"), "star+carry": (False, "carry"), "chain+broadcast": (True, "broadcast")}


def _run(session: PipelineSession, gen, prompt_ids, max_tokens: int, mtp: bool, chain: bool, rewind: str):
    session.chain, session.rewind = chain, rewind
    trunk = session.trunk()
    r = gen.generate(GenerationRequest(tuple(prompt_ids), max_tokens, SamplingParams(), mtp=mtp), trunk)
    return r, trunk.timings


def pipeline_bench(model: str, prompt_ids, max_tokens: int, repeats: int, n_workers: int,
                   addresses: list[str] | None, single: dict) -> dict:
    """Plain and MTP through workers, with overhead per hop and bytes on the wire."""
    tmp = tempfile.TemporaryDirectory()
    cluster = None if addresses else LocalCluster(n_workers, Path(tmp.name))
    try:
        addrs = addresses or cluster.addresses
        session = PipelineSession(model, addrs, mtp=True, progress=False)
        gen = session.generator
        tps = {f"{m}:{k}": [] for k in MODES for m in ("plain", "mtp")}
        overhead, tok_bytes, acc = [], [], []
        for i in range(repeats + 1):
            for mode, (chain, rewind) in MODES.items():
                for mtp in (False, True):
                    if mode != "chain+carry" and not mtp:
                        continue
                    r, t = _run(session, gen, prompt_ids, max_tokens, mtp, chain, rewind)
                    if not i:
                        continue
                    tps[f"{'mtp' if mtp else 'plain'}:{mode}"].append(r.generation_tps)
                    if mode == "chain+carry":
                        overhead.append((t.wall_us - t.compute_us) / max(t.forwards, 1))
                        if not mtp:
                            tok_bytes.append(t.bytes_sent / max(r.generation_tokens + len(prompt_ids), 1))
                        else:
                            acc.append(r.acceptance)
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
        "pipeline_efficiency": round(med["plain:chain+carry"] / single["plain"], 4),
        "overhead_per_forward_us": round(statistics.median(overhead)),
        "overhead_per_stage_us": round(statistics.median(overhead) / len(addrs)),
        "activation_bytes_per_token": round(statistics.median(tok_bytes)),
        "rejection_extra_messages": {"carry": 0, "broadcast": len(addrs)},
        "mtp_speedup_pipeline": round(med["mtp:chain+carry"] / med["plain:chain+carry"], 4),
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
           "-m", "mtpdist.peer_mlx_lm_pipeline", model, json.dumps(list(prompt_ids)), str(max_tokens), str(repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e), "command": " ".join(cmd)}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    tail = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip() and "Socket" not in ln][-3:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail), "command": " ".join(cmd)}
