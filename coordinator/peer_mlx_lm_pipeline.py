"""mlx-lm's own pipeline (`mlx.launch --backend ring`), the peer that `mtpdist bench` compares with.

Run under mlx.launch; rank 0 prints one JSON line with the greedy decode rate.
"""

import json
import sys

import mlx.core as mx
from mlx_lm.utils import sharded_load

from mtpdist.coordinator.bench_local import mlx_lm_tps


def main(model: str, prompt_ids: list[int], max_tokens: int, repeats: int) -> None:
    group = mx.distributed.init()
    model_, tokenizer = sharded_load(model, pipeline_group=group)
    rates = [mlx_lm_tps(model_, tokenizer, prompt_ids, max_tokens) for _ in range(repeats + 1)][1:]
    if group.rank() == 0:
        print(json.dumps({"mlx_lm_pipeline_tps": sorted(rates)[len(rates) // 2], "ranks": group.size()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
