#!/usr/bin/env python3
"""verify(T)/step for T = 1..8 at Qwen3.5-0.8B and 9B shapes, bf16 and 4-bit (used on the device machine).

Random weights built in memory (mtpdist.coordinator.bench_verify.random_parts), every layer of the
real model; each curve as shipped (SMALL_T from model/layers.py) and with the compiled
small-T GDN path stretched to 9 tokens. Writes OUT_JSON after each curve.
usage: scripts/device_verify_curve.py OUT_JSON [SIZE[:BITS] ...]   (default 0.8b 0.8b:4 9b 9b:4)
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mtpdist.coordinator.bench_verify import random_parts, small_t_limit, verify_curve  # noqa: E402


def main(out_path: str, *specs: str) -> None:
    result = {"mlx_version": mx.__version__, "device": str(mx.default_device()), "models": {}}
    for spec in specs or ("0.8b", "0.8b:4", "9b", "9b:4"):
        size, _, bits = spec.partition(":")
        t = time.time()
        parts = random_parts(size, q_bits=int(bits) if bits else None)
        entry = result["models"][spec] = {"build_s": round(time.time() - t, 1)}
        for small_t in (None, 9):
            with small_t_limit(small_t) as value:
                entry[f"small_t={value}"] = verify_curve(parts, max_t=8, cycles=20)
            print(spec, value, entry[f"small_t={value}"]["verify_over_step"], flush=True)
            Path(out_path).write_text(json.dumps(result, indent=1))
        del parts
        mx.clear_cache()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
