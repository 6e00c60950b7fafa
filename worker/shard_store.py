"""Shards on disk: a streamed shard is written straight into a safetensors file under
the cache, keyed by the model's content hash, so a restarted worker needs nothing sent."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from mtpdist.errors import RequestError
from mtpdist.wire.types import ShardSpec

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "U16": 2, "I16": 2}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class ShardStore:
    """Shards kept on disk under the cache folder, keyed by model hash and layer range."""
    def __init__(self, root: Path):
        self.root = Path(root) / "shards"

    def path(self, spec: ShardSpec) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", spec.model_hash):
            raise RequestError("INVALID_ARGUMENT", "model_hash must be hex")
        return self.root / spec.model_hash / f"{spec.layer_start}-{spec.layer_end}"

    def has(self, spec: ShardSpec) -> bool:
        return (self.path(spec) / "complete").is_file()

    def write(self, spec: ShardSpec, chunks: Iterator[bytes]) -> int:
        """Write the streamed tensors; refuse any tensor outside the shard's layers."""
        header, total = {}, 0
        for t in spec.tensors:
            m = _LAYER.match(t.name)
            if not m or not spec.layer_start <= int(m.group(1)) < spec.layer_end:
                raise RequestError("INVALID_ARGUMENT", f"tensor {t.name} is outside layers "
                                                       f"[{spec.layer_start}, {spec.layer_end})")
            n = 1
            for d in t.shape:
                n *= d
            if t.dtype not in ITEMSIZE or n * ITEMSIZE[t.dtype] != t.nbytes:
                raise RequestError("INVALID_ARGUMENT", f"tensor {t.name}: bad dtype/shape/size")
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [total, total + t.nbytes]}
            total += t.nbytes
        if not header:
            raise RequestError("INVALID_ARGUMENT", "the shard manifest is empty")
        target = self.path(spec)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        got = 0
        with open(tmp / "model.safetensors", "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, leave=False, mininterval=1.0,
                desc=f"receiving layers {spec.layer_start}-{spec.layer_end - 1}") as bar:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for c in chunks:
                got += len(c)
                if got > total:
                    raise RequestError("INVALID_ARGUMENT", f"stream sent more than the manifest's {total} bytes")
                f.write(c)
                bar.update(len(c))
        if got != total:
            raise RequestError("INVALID_ARGUMENT", f"stream ended after {got} of {total} bytes")
        (tmp / "config.json").write_text(spec.config_json)
        (tmp / "complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return got
