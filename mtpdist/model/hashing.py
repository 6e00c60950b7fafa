"""Content hash of a model folder, so a worker can tell its local copy is the same model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm


def cache_dir() -> Path:
    """Where mtpdist keeps shards, hashes and the worker id (MTPDIST_CACHE overrides)."""
    return Path(os.environ.get("MTPDIST_CACHE") or Path.home() / ".cache" / "mtpdist")


def _file_sha256(path: Path, progress: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                     disable=not progress or size < (256 << 20), leave=False) as bar:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def model_hash(model_dir: str | Path, progress: bool = True) -> str:
    """sha256 over config.json and every safetensors file's sha256 (memoized by size+mtime)."""
    root = Path(model_dir).resolve()
    memo_path = cache_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    top = hashlib.sha256((root / "config.json").read_bytes())
    changed = False
    for f in sorted(root.glob("*.safetensors")):
        st = f.stat()
        key = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = _file_sha256(f, progress)
            changed = True
        top.update(f"{f.name}:{memo[key]}".encode())
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return top.hexdigest()[:32]


def tensor_hashes(model_hash: str, names: list[str], compute) -> dict[str, str]:
    """sha256 (hex) of each named tensor of the model `model_hash`, memoized on disk.

    The model hash already covers every byte of the checkpoint, so a tensor's hash under it
    never changes; `compute(name)` runs only for tensors not seen before.
    """
    path = cache_dir() / "tensor-hashes" / f"{model_hash}.json"
    try:
        memo = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    missing = [n for n in names if n not in memo]
    for n in missing:
        memo[n] = compute(n)
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(path)
    return {n: memo[n] for n in names}
