"""Row-stable arithmetic: a verify row (or a batched row) computes the bits a lone step computes.

Speculative decoding is token-identical to plain greedy decoding only if the logits of a
position do not depend on how many rows shared its forward pass: a one-row step, a
(k+1)-row verify pass, a batch of sequences. MLX's CPU backend has this property. Its CUDA
backend (MLX 0.32.4, measured on an H100; BENCHMARKS.md) does not:

- attention with several queries takes another kernel than one query does, and rows part
  by a bf16 step: this alone made greedy MTP leave plain greedy within 10-30 tokens;
- a quantized matmul of fewer than 8 rows takes a matrix-vector kernel (row-invariant
  among 1-7 rows), 8 rows or more a tiled kernel (row-invariant among 8+ rows); the two
  differ, so a batch of 8+ rows parts from a lone sequence's step.

Modes (`MTPDIST_ROW_STABLE`):
- `auto` (default): `on` where the CUDA backend is in use, else `off`.
- `on`: the queries of a short pass (verify, <= SMALL_T rows) attend one at a time, as a
  step's single query does. Costs nothing measurable; makes one sequence's MTP exact
  (depth <= 6: fewer than 8 rows).
- `strict`: also pads every forward with zero rows up to `PAD_ROWS` (once per forward: the
  decoder layers carry the padding, the mixers skip it) so every matmul of a step, a
  verify pass or a batch takes the tiled kernel: batches exact too, a lone step ~1.6x.
- `off`: the backend's own kernels.
"""

from __future__ import annotations

import os

import mlx.core as mx

PAD_ROWS = 8  # MLX 0.32 CUDA: fewer rows take a matrix-vector kernel, 8 or more the tiled one

_override: str | None = None
_cuda_cache: list[bool] = []
MODES = ("auto", "on", "strict", "off")


def mode() -> str:
    """The row-stable mode in force: on, strict or off (auto resolved for this backend)."""
    m = _override or os.environ.get("MTPDIST_ROW_STABLE", "auto").lower()
    if m not in MODES:
        m = "auto"
    if m == "auto":
        return "on" if _cuda() else "off"
    return m


def enabled() -> bool:
    """Whether short passes take the row-stable attention path in this process."""
    return mode() != "off"


def strict() -> bool:
    """Whether forwards are also padded to PAD_ROWS rows (batches exact too)."""
    return mode() == "strict"


def set_mode(value: str | None) -> None:
    """Force a mode (tests, benchmarks); None: back to the environment / backend default."""
    global _override
    if value is not None and value not in MODES:
        raise ValueError(f"row-stable mode must be one of {', '.join(MODES)}, not {value!r}")
    _override = value


def identity_note() -> str:
    """What this process's backend and mode promise about greedy MTP vs plain greedy output."""
    dev = mx.default_device()
    if dev == mx.cpu:
        return "exact: the CPU backend computes a row alike whatever the pass's row count"
    if not _cuda():
        return ("not measured on this backend (Metal): near-tied logits may make MTP or batched "
                "greedy output part from plain greedy; tested exact on the CPU and CUDA backends")
    m = mode()
    if m == "strict":
        return "exact: CUDA with MTPDIST_ROW_STABLE=strict (verify rows and batches take a step's kernels)"
    if m == "on":
        return ("exact for one sequence at MTP depth <= 6 (CUDA, row-stable attention); in a batch of 8 "
                "or more rows near-tied logits may part (MTPDIST_ROW_STABLE=strict makes batches exact "
                "at ~1.6x the step time)")
    return ("not guaranteed: CUDA with MTPDIST_ROW_STABLE=off; verify rows differ from steps by a bf16 "
            "step, so near-tied logits part (9B-shaped 4-bit: within 10-30 tokens)")


def _cuda() -> bool:
    if not _cuda_cache:
        cuda = getattr(mx, "cuda", None)
        _cuda_cache.append(bool(cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu))
    return _cuda_cache[0]


def pad_rows(h: mx.array) -> mx.array:
    """h [1, n, H] with zero rows appended up to PAD_ROWS in strict mode."""
    n = h.shape[1]
    if n >= PAD_ROWS or not strict():
        return h
    return mx.concatenate([h, mx.zeros((1, PAD_ROWS - n, h.shape[-1]), dtype=h.dtype)], axis=1)


def fill_rows(y: mx.array, total: int) -> mx.array:
    """A mixer's output for the real rows [1, n, ...] extended with zero rows to `total`."""
    n = y.shape[1]
    if n == total:
        return y
    return mx.concatenate([y, mx.zeros((1, total - n, *y.shape[2:]), dtype=y.dtype)], axis=1)


def padded(fn, x: mx.array) -> mx.array:
    """fn(x) for x [..., H] holding fewer than PAD_ROWS rows, computed on x padded with zero
    rows (rows of a matmul do not interact: only the kernel changes)."""
    n = x.size // x.shape[-1]
    if n >= PAD_ROWS or x.ndim < 2 or not strict():
        return fn(x)
    flat = x.reshape(n, x.shape[-1])
    y = fn(mx.concatenate([flat, mx.zeros((PAD_ROWS - n, x.shape[-1]), dtype=x.dtype)]))[:n]
    return y.reshape(*x.shape[:-1], y.shape[-1])
