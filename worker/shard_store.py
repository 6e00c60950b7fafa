"""Shards on disk: a streamed shard is written straight into a safetensors file under
the cache, keyed by the model's content hash, so a restarted worker needs nothing sent.

Nothing is trusted by name: every tensor's bytes are hashed as they stream in and again
when a cached shard is loaded, against the sha256 the coordinator's manifest carries. The
cache is capped in size; the least recently used shards go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
_READ = 8 << 20
log = logging.getLogger("mtpdist.worker")


def check_manifest(spec: ShardSpec) -> dict:
    """The safetensors header for the spec's manifest; refuses tensors outside the layers, bad sizes, no hashes."""
    header, total = {}, 0
    for t in spec.tensors:
        m = _LAYER.match(t.name)
        if not m or not spec.layer_start <= int(m.group(1)) < spec.layer_end:
            raise RequestError("invalid", f"tensor {t.name} is outside layers "
                                                   f"[{spec.layer_start}, {spec.layer_end})")
        n = 1
        for d in t.shape:
            n *= d
        if t.dtype not in ITEMSIZE or n * ITEMSIZE[t.dtype] != t.nbytes:
            raise RequestError("invalid", f"tensor {t.name}: bad dtype/shape/size")
        if len(t.sha256) != 32:
            raise RequestError("invalid", f"tensor {t.name}: the manifest must carry its sha256")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [total, total + t.nbytes]}
        total += t.nbytes
    if not header:
        raise RequestError("invalid", "the shard manifest is empty")
    return header


class ShardStore:
    """Shards kept on disk under the cache folder, keyed by model hash and layer range."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root) / "shards"
        self.max_bytes = max_bytes
        for stale in self.root.glob("*/*.partial"):  # left by a worker killed mid-stream
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, spec: ShardSpec) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", spec.model_hash):
            raise RequestError("invalid", "model_hash must be hex")
        return self.root / spec.model_hash / f"{spec.layer_start}-{spec.layer_end}"

    def has(self, spec: ShardSpec) -> bool:
        """A complete cached shard written for exactly this manifest (contents are checked at load)."""
        try:
            return (self.path(spec) / "complete").read_text() == spec.digest()
        except OSError:
            return False

    def remove(self, spec: ShardSpec) -> None:
        shutil.rmtree(self.path(spec), ignore_errors=True)

    def touch(self, spec: ShardSpec) -> None:
        """Mark a shard as just used (the LRU order is the marker's mtime)."""
        try:
            os.utime(self.path(spec) / "complete")
        except OSError:
            pass

    def write(self, spec: ShardSpec, chunks: Iterator[bytes]) -> int:
        """Write the streamed tensors, checking each one's sha256; nothing is kept unless all match."""
        header = check_manifest(spec)
        total = sum(t.nbytes for t in spec.tensors)
        target = self.path(spec)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            got = self._receive(spec, header, total, chunks, tmp / "model.safetensors")
            (tmp / "config.json").write_text(spec.config_json)
            (tmp / "complete").write_text(spec.digest())
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=target)
        return got

    def _receive(self, spec: ShardSpec, header: dict, total: int, chunks: Iterator[bytes], out: Path) -> int:
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        tensors = iter(spec.tensors)
        cur, left, h = None, 0, None
        got = 0
        with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, leave=False, mininterval=1.0,
                                        desc=f"receiving layers {spec.layer_start}-{spec.layer_end - 1}") as bar:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for c in chunks:
                got += len(c)
                if got > total:
                    raise RequestError("invalid", f"stream sent more than the manifest's {total} bytes")
                f.write(c)
                bar.update(len(c))
                view = memoryview(c)
                while len(view):  # hash tensor by tensor, across chunk boundaries
                    if left == 0:
                        cur = next(tensors)
                        left, h = cur.nbytes, hashlib.sha256()
                    take = min(left, len(view))
                    h.update(view[:take])
                    view, left = view[take:], left - take
                    if left == 0:
                        _check(h, cur, "as received")
        if got != total:
            raise RequestError("invalid", f"stream ended after {got} of {total} bytes")
        for t in tensors:  # zero-byte tensors at the end
            _check(hashlib.sha256(), t, "as received")
        return got

    def verify(self, spec: ShardSpec) -> None:
        """Re-hash a cached shard against the manifest; a mismatch deletes it and raises DATA_LOSS."""
        path = self.path(spec)
        try:
            with open(path / "model.safetensors", "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                want = check_manifest(spec)
                if header != want or (path / "config.json").read_text() != spec.config_json:
                    raise _Mismatch("its layout or config differs from the manifest")
                for t in spec.tensors:
                    h, left = hashlib.sha256(), t.nbytes
                    while left:
                        piece = f.read(min(_READ, left))
                        if not piece:
                            raise _Mismatch(f"tensor {t.name} is truncated")
                        h.update(piece)
                        left -= len(piece)
                    if h.digest() != t.sha256:
                        raise _Mismatch(f"tensor {t.name} does not match its sha256")
        except (OSError, ValueError, struct.error, _Mismatch) as e:
            self.remove(spec)
            why = e if isinstance(e, _Mismatch) else f"unreadable ({e})"
            log.warning("cached layers %d-%d of model %s failed the content check: %s; deleted",
                        spec.layer_start, spec.layer_end - 1, spec.model_hash[:12], why)
            raise RequestError("data_loss", f"cached shard layers {spec.layer_start}-{spec.layer_end - 1} failed the "
                                            f"content check ({why}); deleted it, send the shard again") from None

    def shards(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, folder) of every complete cached shard, oldest first."""
        out = []
        for marker in self.root.glob("*/*/complete"):
            folder = marker.parent
            try:
                size = sum(f.stat().st_size for f in folder.iterdir())
                out.append((marker.stat().st_mtime, size, folder))
            except OSError:
                continue
        return sorted(out)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used shards until the cache is within its cap."""
        if self.max_bytes is None:
            return []
        shards = self.shards()
        total = sum(s for _, s, _ in shards)
        gone = []
        for _, size, folder in shards:
            if total <= self.max_bytes:
                break
            if folder == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            gone.append(folder)
            log.info("cache over %.1f GB: removed %s (least recently used)", self.max_bytes / 1e9,
                     folder.relative_to(self.root))
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
        return gone


class _Mismatch(Exception):
    pass


def _check(h, t, when: str) -> None:
    if h.digest() != t.sha256:
        log.warning("refused a shard: tensor %s does not match its sha256 %s", t.name, when)
        raise RequestError("data_loss", f"tensor {t.name} does not match its sha256 {when}; shard refused")
