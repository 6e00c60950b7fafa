"""FP8 (E4M3) release weights -> bf16, as they are read.

Qwen's FP8 releases store a weight as E4M3 bytes (read as uint8) with either a block grid of
inverse scales beside it (`<key>_scale_inv`, one per 128 x 128 block) or, for qwen4_exp's
n-gram table shards, one scalar scale for the whole table (`...ngram_embedding.weight_scale`).
"""

from __future__ import annotations

import mlx.core as mx

BLOCK = 128
SCALE_SUFFIXES = ("_scale_inv", ".weight_scale")


def from_block_fp8(weight: mx.array, scale_inv: mx.array, block: int = BLOCK) -> mx.array:
    """A 2-D E4M3 weight [R, C] times its per-block scales [ceil(R/b), ceil(C/b)] -> bf16."""
    rows, cols = weight.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"FP8 scales {tuple(scale_inv.shape)} do not fit a {rows}x{cols} weight (want {want})")
    w = mx.from_fp8(weight, dtype=mx.bfloat16)
    pr, pc = want[0] * block - rows, want[1] * block - cols
    if pr or pc:
        w = mx.pad(w, ((0, pr), (0, pc)))
    w = w.reshape(want[0], block, want[1], block) * scale_inv.astype(mx.bfloat16)[:, None, :, None]
    return w.reshape(want[0] * block, want[1] * block)[:rows, :cols]


def from_scalar_fp8(weight: mx.array, scale: mx.array) -> mx.array:
    """E4M3 bytes times one scale -> bf16."""
    return mx.from_fp8(weight, dtype=mx.bfloat16) * scale.astype(mx.bfloat16).reshape(())
