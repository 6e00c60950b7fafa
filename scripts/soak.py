#!/usr/bin/env python3
"""Soak: concurrent streaming clients against a coordinator and two local workers.

Bounded in time and count. Some clients hang up mid-stream. Reports requests served,
failures, leaked sequence state on the workers, and worker/coordinator memory before and
after, as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["import os\n", "def main(", "class Config:\n", "for key, value in ", "# Copyright", "if __name__ =="]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_coordinator(model: str, workers: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "mtpdist.cli", "coordinator", "--model", model, "--mtp", "--insecure",
                          "--port", "0", *sum((["--worker", w] for w in workers), [])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        m = re.search(r"serving (http://\S+/v1)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, m.group(1)
    raise RuntimeError("coordinator did not start")


def soak(model: str, seconds: float, clients: int, max_tokens: int, hangup: float, seed: int = 0) -> dict:
    from mtpdist.coordinator.local_cluster import LocalCluster
    from mtpdist.wire.client import WorkerClient
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(2, Path(tmp)) as cluster:
        coord, url = start_coordinator(model, cluster.addresses)
        try:
            expected = {}
            for p in PROMPTS:  # greedy reference answers (and warm-up)
                r = httpx.post(url + "/completions", timeout=120,
                               json={"prompt": p, "max_tokens": max_tokens, "temperature": 0})
                expected[p] = r.json()["choices"][0]["text"]
            before = {"workers_mib": [round(rss_mib(w.proc.pid), 1) for w in cluster.workers],
                      "coordinator_mib": round(rss_mib(coord.pid), 1)}
            counts = {"completed": 0, "hung_up": 0, "failed": 0}
            failures: list[str] = []
            lock = threading.Lock()
            end = time.time() + seconds

            def client(i: int):
                rng = random.Random(seed * 1000 + i)
                while time.time() < end:
                    prompt = rng.choice(PROMPTS)
                    leave = rng.random() < hangup
                    try:
                        text = []
                        with httpx.stream("POST", url + "/completions", timeout=120, json={
                                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
                            if r.status_code != 200:
                                raise RuntimeError(f"HTTP {r.status_code}")
                            for line in r.iter_lines():
                                if line.startswith("data: {"):
                                    d = json.loads(line[6:])
                                    if "error" in d:
                                        raise RuntimeError(d["error"]["message"])
                                    text.append(d["choices"][0]["text"])
                                    if leave and len(text) >= 2:
                                        break
                        with lock:
                            if leave:
                                counts["hung_up"] += 1
                            elif "".join(text) == expected[prompt]:
                                counts["completed"] += 1
                            else:
                                counts["failed"] += 1
                                failures.append(f"wrong text for {prompt!r}")
                    except Exception as e:  # every failure is counted and reported
                        with lock:
                            counts["failed"] += 1
                            failures.append(str(e)[:200])

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            over_time, stop_sampling = [], threading.Event()

            def sample():  # worker RSS every 15 s: flat once the kept-prefix cache is full
                while not stop_sampling.wait(15):
                    over_time.append([round(rss_mib(w.proc.pid), 1) for w in cluster.workers])
            sampler = threading.Thread(target=sample, daemon=True)
            t0 = time.time()
            sampler.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            stop_sampling.set()
            time.sleep(1.0)  # let the last hang-ups reach the engine
            infos = [WorkerClient(a).describe() for a in cluster.addresses]
            sequences = [i.sequences for i in infos]
            after = {"workers_mib": [round(rss_mib(w.proc.pid), 1) for w in cluster.workers],
                     "coordinator_mib": round(rss_mib(coord.pid), 1)}
            return {"seconds": round(wall, 1), "clients": clients, "max_tokens": max_tokens, "hangup_share": hangup,
                    "requests": sum(counts.values()), **counts, "failures": failures[:10],
                    "leaked_sequences": sequences, "memory_before": before, "memory_after": after,
                    "workers_mib_every_15s": over_time, "kept_prefixes": [i.prefixes for i in infos],
                    "worker_state_mib": [round(i.state_bytes / 2**20, 1) for i in infos]}
        finally:
            coord.terminate()
            coord.wait(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "mtpdist" / "demo_model"))
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--hangup", type=float, default=0.25, help="share of clients that leave mid-stream")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = soak(a.model, a.seconds, a.clients, a.max_tokens, a.hangup)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if result["failed"] == 0 and not any(result["leaked_sequences"]) else 1


if __name__ == "__main__":
    sys.exit(main())
