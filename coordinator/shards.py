"""A shard's tensors as a manifest plus a byte stream (coordinator side of weight loading)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from mtpdist.model.hashing import tensor_hashes
from mtpdist.model.weights import Checkpoint
from mtpdist.wire.types import TensorInfo

ST_CODES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
            mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16"}
CHUNK = 4 << 20


class ShardSource:
    """Reads layers [start, end) of a model in canonical layout, lazily."""

    def __init__(self, model_dir: str | Path, start: int, end: int):
        self.ckpt = Checkpoint(model_dir)
        prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
        self.tensors = dict(sorted(self.ckpt.tensors(lambda k: k.startswith(prefixes)).items()))

    def manifest(self, model_hash: str) -> tuple[TensorInfo, ...]:
        """Every tensor's name, layout and the sha256 of its bytes as `chunks` sends them (memoized per model)."""
        sums = tensor_hashes(model_hash, list(self.tensors), self._hash_tensor)
        return tuple(TensorInfo(k, ST_CODES[v.dtype], tuple(v.shape), v.nbytes, bytes.fromhex(sums[k]))
                     for k, v in self.tensors.items())

    def _hash_tensor(self, name: str) -> str:
        return hashlib.sha256(_raw(self.tensors[name])).hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())

    def chunks(self, on_bytes=lambda n: None) -> Iterator[bytes]:
        """The tensors' bytes in manifest order; one tensor is materialized at a time."""
        for v in self.tensors.values():
            data = _raw(v)
            for i in range(0, len(data), CHUNK):
                piece = bytes(data[i : i + CHUNK])
                on_bytes(len(piece))
                yield piece
        self.ckpt.close()


def _raw(v: mx.array) -> memoryview:
    """A tensor's bytes in the canonical little-endian layout (bfloat16 as its raw 16 bits)."""
    raw = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
    return memoryview(np.ascontiguousarray(np.asarray(raw))).cast("B")
