"""What a worker's store does around a forward's compute, for a stage of many layers.

A synthetic stage of `--layers` layers (three GatedDeltaNet to one attention, tiny widths) runs
decode steps of one sequence through `SequenceStore`, as a worker's compute loop does: the
forward, then `tidy()` once its output would have gone on. Prints the medians of what the
forward spends outside its timed compute (before the output can leave: checks, rewinds, the
sequence's bookkeeping) and what `tidy` spends after (freeing snapshots below the floor, the
state budget). The hop bench's bundled model has 2-4 layers a stage; a real model has 16-48.

    python scripts/store_bookkeeping.py [--layers 32] [--steps 400]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mtpdist.model.config import ModelConfig
from mtpdist.model.qwen35 import LayerStack
from mtpdist.model.synthetic import make_config
from mtpdist.wire.types import SequenceRows
from mtpdist.worker.sequences import SequenceStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    config = ModelConfig.from_dict(make_config("tiny", num_layers=args.layers))
    stack = LayerStack(config, 0, args.layers)
    mx.eval(stack.parameters())
    store = SequenceStore(stack, config.hidden_size)
    x = mx.ones((1, config.hidden_size))
    before, after = [], []
    for p in range(args.steps):
        t0 = time.perf_counter()
        out = store.forward([SequenceRows("s", p, 1, snapshots=(), floor=p)], x, checked=True)
        before.append((time.perf_counter() - t0) * 1e6 - out.compute_us)
        t0 = time.perf_counter()
        store.tidy()
        after.append((time.perf_counter() - t0) * 1e6)
    warm = args.steps // 8
    print(f"{args.layers} layers: before the output {statistics.median(before[warm:]):.1f} us, "
          f"after it (tidy) {statistics.median(after[warm:]):.1f} us (medians, warm)")


if __name__ == "__main__":
    main()
