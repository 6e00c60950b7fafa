"""What the MLX backend in this process can compute, found by trying (never by platform name).

MLX's backends differ in which dtypes some ops accept: the CPU backend's `gather_mm` (the
unquantized mixture-of-experts matmul) takes float32 only, while Metal and CUDA also take
bf16/fp16. Code that must run everywhere asks here and adapts.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchLinear


def gather_mm_supports(dtype: mx.Dtype) -> bool:
    """Whether `mx.gather_mm` computes in `dtype` on the default device (a tiny real call)."""
    x = mx.zeros((1, 1, 1, 64), dtype=dtype)
    w = mx.zeros((2, 8, 64), dtype=dtype)
    try:  # the same call shape SwitchLinear makes
        mx.eval(mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=mx.array([[1]], dtype=mx.uint32)))
    except RuntimeError:  # CPU: "[GatherMM::eval] Currently only supports float32."
        return False
    return True


def experts_to_supported_dtype(module: nn.Module) -> list[str]:
    """Cast unquantized expert weights to float32 where this backend's gather_mm lacks their dtype.

    The experts then compute in float32 (their bf16 input is promoted); quantized experts
    (gather_qmm) are left alone. Costs twice the memory of those weights, only on such
    backends. Returns the paths of the modules cast.
    """
    verdict: dict = {}
    cast = []
    for path, m in module.named_modules():
        if not isinstance(m, SwitchLinear) or m.weight.dtype == mx.float32:
            continue
        dt = m.weight.dtype
        if dt not in verdict:
            verdict[dt] = gather_mm_supports(dt)
        if not verdict[dt]:
            m.update(tree_map(lambda v: v.astype(mx.float32), m.parameters()))
            cast.append(path)
    if cast:
        mx.eval(module.parameters())
    return cast


def backend_name() -> str:
    """"metal", "cuda" or "cpu": where MLX runs by default here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def mlx_version() -> str:
    """The installed MLX version."""
    return mx.__version__
