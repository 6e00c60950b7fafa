"""mlx-lm's own pipeline (`mlx.launch --backend ring`), the peer that `mtpdist bench` compares with.

Run under mlx.launch; rank 0 prints one JSON line with the greedy decode rate.
"""

import json
import sys
import time

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load


def main(model: str, prompt_ids: list[int], max_tokens: int, repeats: int) -> None:
    group = mx.distributed.init()
    model_, tokenizer = sharded_load(model, pipeline_group=group)
    rates = []
    for i in range(repeats + 1):
        t_first = t_last = None
        n = 0
        for _ in stream_generate(model_, tokenizer, prompt_ids, max_tokens=max_tokens):
            t_last = time.perf_counter()
            t_first = t_first or t_last
            n += 1
        if i:
            rates.append((n - 1) / (t_last - t_first))
    if group.rank() == 0:
        print(json.dumps({"mlx_lm_pipeline_tps": sorted(rates)[len(rates) // 2], "ranks": group.size()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
