"""Warm a freshly loaded shard: run once the shapes that steady decoding will, before LoadShard
answers. On MLX CUDA the first forward of a new shape compiled kernels for minutes (~165 s on
an H100), which a first real unit must not pay; the coordinator gets the shard only when it
is ready. Runs on the worker's MLX thread; leaves no sequence behind."""

from __future__ import annotations

import logging
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mtpdist.model.backend import backend_name
from mtpdist.wire.types import SequenceRows

log = logging.getLogger("mtpdist.worker")
# Rows per sequence a step carries: a decode step (1) and verify passes up to MTP depth 3 (+1).
STEP_ROWS = (1, 2, 3, 4)
BATCHES = (1, 2, 4)      # sequences in one forward


def compiles_kernels() -> bool:
    """Whether a new shape's first forward builds kernels here (Metal, CUDA). The CPU backend
    builds none: warming it would only delay LoadShard (~0.5 s for the demo model's half)."""
    return backend_name() != "cpu"


def warm(store, prompt_rows: int = 8) -> float:
    """Run each (sequences x step rows) shape once after a short prefill; returns seconds taken."""
    t0 = time.perf_counter()
    dtype = next((v.dtype for _, v in tree_flatten(store.stack.parameters())
                  if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    names = []
    try:
        for n in BATCHES:
            seqs = [f"__warm-{n}-{i}" for i in range(n)]
            names += seqs
            _run(store, [SequenceRows(s, 0, prompt_rows) for s in seqs], dtype)     # a prefill chunk
            at = prompt_rows
            for rows in STEP_ROWS:
                _run(store, [SequenceRows(s, at, rows, snapshots=tuple(range(1, rows)))
                             for s in seqs], dtype)
                at += rows
    finally:
        for s in names:
            store.release(s)
    took = time.perf_counter() - t0
    log.info("warmed decode and verify shapes (1-%d rows, 1-%d sequences) in %.2f s", STEP_ROWS[-1], BATCHES[-1], took)
    return took


def _run(store, rows: list[SequenceRows], dtype) -> None:
    x = mx.zeros((sum(r.tokens for r in rows), store.hidden_size), dtype=dtype)
    mx.eval(store.forward(rows, x).hidden)
    store.tidy()
