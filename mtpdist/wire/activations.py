"""mx.array <-> wire Activation, with the checks a server needs on untrusted input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import RequestError
from .types import ACTIVATION_DTYPES, Activation

_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NAME = {v: k for k, v in _MX.items()}


def wire_bits(x: mx.array) -> mx.array:
    """`x` as an array with a buffer format (bfloat16's bits as uint16, a lazy view). Evaluate it
    together with `x`: evaluating the view on its own later costs one more eval (~0.1 ms on a CPU)."""
    return x.view(mx.uint16) if x.dtype == mx.bfloat16 else x


def to_activation(x: mx.array, copy: bool = True) -> Activation:
    """Encode a float array (evaluates it). `copy=False`: the bytes are a view of the array
    (a memoryview, which keeps it alive), for a frame that is written at once."""
    return split_activation(x, None, (x.shape[0],), copy)[0]


def split_activation(x: mx.array, bits: mx.array | None, rows: tuple[int, ...],
                     copy: bool = False) -> list[Activation]:
    """Consecutive blocks of `rows` rows of `x` [N, H], each as an activation; without `copy`
    all are views of one buffer (no slice of x, so no eval per block). `bits`: x's `wire_bits`,
    already evaluated with x (None: evaluated here)."""
    name = _NAME.get(x.dtype)
    if name is None:
        raise ValueError(f"activations must be float32/float16/bfloat16, not {x.dtype}")
    if bits is None:    # else it was evaluated with x (a stage's output): no eval, not even an empty one
        bits = wire_bits(x)
        mx.eval(bits)
    try:     # the array's own buffer: no numpy object in between
        view = memoryview(bits).cast("B")
    except TypeError:   # not contiguous (a strided view): one contiguous copy first
        view = memoryview(np.ascontiguousarray(bits)).cast("B")
    row = len(view) // max(x.shape[0], 1)
    out, start = [], 0
    for n in rows:
        part = view[start * row:(start + n) * row]
        out.append(Activation(data=part.tobytes() if copy else part, dtype=name, shape=(n, *x.shape[1:])))
        start += n
    return out


def from_activation(a: Activation, hidden_size: int | None = None, max_tokens: int = 1 << 16) -> mx.array:
    """Decode, refusing wrong dtypes, shapes that don't match the bytes, or the model."""
    if a.dtype not in ACTIVATION_DTYPES:
        raise RequestError("invalid", f"activation dtype {a.dtype!r} is not one of {ACTIVATION_DTYPES}")
    if len(a.shape) != 2 or min(a.shape, default=0) < 1:
        raise RequestError("invalid", f"activation shape must be [tokens, hidden], got {list(a.shape)}")
    if hidden_size is not None and a.shape[1] != hidden_size:
        raise RequestError("invalid", f"activation hidden size {a.shape[1]} != model's {hidden_size}")
    if a.shape[0] > max_tokens:
        raise RequestError("invalid", f"{a.shape[0]} tokens in one chunk exceeds the limit {max_tokens}")
    n = a.shape[0] * a.shape[1]
    if len(a.data) != n * _ITEMSIZE[a.dtype]:
        raise RequestError("invalid", f"activation has {len(a.data)} bytes, shape {list(a.shape)} "
                                               f"of {a.dtype} needs {n * _ITEMSIZE[a.dtype]}")
    # One copy, straight from the buffer (a memoryview cast is about half the cost of numpy's
    # frombuffer + reshape when the code is cold, as it is at each hop); 16-bit floats as uint16.
    view = memoryview(a.data).cast("B").cast("f" if a.dtype == "float32" else "H", a.shape)
    arr = mx.array(view)
    return arr if a.dtype == "float32" else arr.view(_MX[a.dtype])
