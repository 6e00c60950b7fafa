#!/usr/bin/env python3
"""Bench a Qwen3.5-0.8B-shaped random model on whatever MLX backend is here (used on the device machine).

Imports only the model/engine/bench code, so it runs where the server's packages are absent.
usage: scripts/device_bench.py OUT_JSON [SIZE]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtpdist.bench import run_bench  # noqa: E402
from mtpdist.model.convert import ConvertOptions, convert  # noqa: E402
from mtpdist.model.synthetic import make_synthetic  # noqa: E402

out, size = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "0.8b")
with tempfile.TemporaryDirectory() as tmp:
    t = time.time()
    raw = make_synthetic(Path(tmp) / "raw", size)
    model = convert(raw, Path(tmp) / "bf16", ConvertOptions(dtype="bfloat16"))
    print(f"model ready in {time.time() - t:.0f}s", flush=True)
    args = argparse.Namespace(model=str(model), prompt="def fibonacci(n):\n    \"\"\"Return the n-th number.\"\"\"\n",
                              max_tokens=64, repeats=3, cycles=30, out=out, skip_mlx_lm=False, workers=0, worker=[])
    r = run_bench(args)
    print(json.dumps({k: r[k] for k in ("device", "tps_median", "plain_over_mlx_lm", "mtp_over_plain", "pass_costs")},
                     indent=1))
