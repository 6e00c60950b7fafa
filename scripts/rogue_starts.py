#!/usr/bin/env python3
"""Repeated starts with rogue mDNS adverts (issue 17, item 1): how often does a start serve
through the real workers? Four rogues (plaintext, a certificate from another CA, a tarpit, a
closed port) advertise before two real workers start, four more clone a real worker's advert
after; then `mtpdist generate --workers N` runs --starts times for N = 1 and 2.

usage: python scripts/rogue_starts.py [--starts 10] [--model DIR]   (loopback only)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SECRET = "rogue-starts-secret"
KINDS = "tls,plaintext,tarpit,closed"


def rogues(cluster: str, alone: bool) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "rogue.py"), cluster, "a-guess", KINDS,
                          *(["--alone"] if alone else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for _ in KINDS.split(","):
        p.stdout.readline()
    return p


def main() -> int:
    from mtpdist.coordinator.demo import DEMO_MODEL
    from mtpdist.coordinator.local_cluster import LocalCluster
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    args = ap.parse_args()
    cluster = f"r{uuid.uuid4().hex[:6]}"
    gen = [sys.executable, "-m", "mtpdist.cli", "generate", "--model", args.model, "--prompt", "import os",
           "--max-tokens", "8", "--json"]
    want = json.loads(subprocess.run(gen, capture_output=True, text=True, check=True).stdout)["token_ids"]
    procs = [rogues(cluster, alone=True)]
    real = LocalCluster(2, Path(tempfile.mkdtemp()), "--cluster", cluster, token=SECRET, advertise=True)
    procs.append(rogues(cluster, alone=False))
    results = {}
    try:
        for n in (1, 2):
            ok, secs = 0, []
            for _ in range(args.starts):
                t0 = time.monotonic()
                p = subprocess.run(gen + ["--workers", str(n), "--cluster", cluster, "--mdns-interface", "127.0.0.1",
                                          "--token", SECRET, "--discover-timeout", "30"],
                                   capture_output=True, text=True, timeout=300)
                secs.append(time.monotonic() - t0)
                good = p.returncode == 0 and json.loads(p.stdout)["token_ids"] == want
                ok += good
                if not good:
                    print(p.stderr[-2000:], file=sys.stderr)
            results[f"workers_{n}"] = {"starts": args.starts, "served_by_real_workers": ok,
                                       "median_s": round(sorted(secs)[len(secs) // 2], 2)}
            print(json.dumps({f"workers_{n}": results[f"workers_{n}"]}), flush=True)
    finally:
        for p in procs:
            p.communicate("", timeout=10)
        real.stop()
    return 0 if all(r["served_by_real_workers"] == r["starts"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
