"""A shard's tensors as a manifest plus a byte stream (coordinator side of weight loading)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..model.weights import Checkpoint
from ..wire.types import TensorInfo

ST_CODES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
            mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16"}
CHUNK = 4 << 20


class ShardSource:
    """Reads layers [start, end) of a model in canonical layout, lazily."""

    def __init__(self, model_dir: str | Path, start: int, end: int):
        self.ckpt = Checkpoint(model_dir)
        prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
        self.tensors = dict(sorted(self.ckpt.tensors(lambda k: k.startswith(prefixes)).items()))

    def manifest(self) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(k, ST_CODES[v.dtype], tuple(v.shape), v.nbytes) for k, v in self.tensors.items())

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())

    def chunks(self, on_bytes=lambda n: None) -> Iterator[bytes]:
        """The tensors' bytes in manifest order; one tensor is materialized at a time."""
        for v in self.tensors.values():
            raw = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
            data = memoryview(np.ascontiguousarray(np.asarray(raw))).cast("B")
            for i in range(0, len(data), CHUNK):
                piece = bytes(data[i : i + CHUNK])
                on_bytes(len(piece))
                yield piece
        self.ckpt.close()
