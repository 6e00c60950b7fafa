"""Reading Qwen3.5/3.6/3.8 and qwen4_exp checkpoints into one canonical key layout.

Canonical keys: `model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight`,
`lm_head.weight`, `mtp.*`; conv1d weights as [C, K, 1]; RMSNorm weights effective (not
offset from 1); MoE experts fused as `mlp.switch_mlp.{gate,up,down}_proj.weight`.

Raw Hugging Face checkpoints store the GDN conv1d weight as [C, 1, K] and most RMSNorm
weights as an offset from 1. That conv layout is the one signal used to tell the two
layouts apart, so the shift is applied exactly once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import ModelLoadError
from .fp8 import SCALE_SUFFIXES, from_block_fp8, from_scalar_fp8

_SKIP_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")
_SHIFTED_NORM_SUFFIXES = (
    ".input_layernorm.weight", ".post_attention_layernorm.weight",
    ".q_norm.weight", ".k_norm.weight",
    # qwen4_exp: hyper-connection, indexer and n-gram-embedding norms (its GDN norm is not shifted)
    ".hc_norm.weight", ".q_layernorm.weight", ".k_layernorm.weight",
    ".norm_key.weight", ".norm_query.weight", ".norm_conv.weight",
)
_SHIFTED_NORM_KEYS = (
    "model.norm.weight", "mtp.norm.weight",
    "mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_embedding.weight",
)
# qwen4_exp ships its n-gram table in shards (concatenated along rows) and its hash constants
# as buffers (derived from the config here, so they are not loaded).
_NGRAM_SHARD = re.compile(r"^(.*\.ngram_embedding)\.shard_(\d+)\.(weight|scales|biases)$")
_DERIVED_SUFFIXES = (".layer_multipliers", ".ngram_heads_offsets", ".ngram_heads_vocab_sizes")
_PER_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def canonical_key(key: str) -> str | None:
    """Map a checkpoint key (raw HF or mlx-lm layout) to the canonical layout; None to skip."""
    if key.startswith(_SKIP_PREFIXES):
        return None
    for prefix, repl in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.", ""), ("model.mtp.", "mtp.")):
        if key.startswith(prefix):
            key = repl + key[len(prefix):]
            break
    if key.startswith(_SKIP_PREFIXES) or key.endswith(_DERIVED_SUFFIXES):
        return None
    return key


def _is_shifted_norm(key: str, value: mx.array) -> bool:
    return value.ndim == 1 and (key in _SHIFTED_NORM_KEYS or key.endswith(_SHIFTED_NORM_SUFFIXES))


class Checkpoint:
    """A model folder's safetensors, read lazily, with keys in the canonical layout."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        files = self._weight_files()
        self._files: dict[Path, dict[str, mx.array]] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        self._made: dict[str, tuple[str, tuple[str, ...]]] | None = None
        for f in files:
            for key in self._arrays(f):
                ck = canonical_key(key)
                if ck is not None:
                    self._where[ck] = (f, key)
        if not self._where:
            raise ModelLoadError(f"{self.path}: the safetensors files hold no weights")
        conv = next((k for k in self._where if k.endswith("conv1d.weight")), None)
        self.raw_layout = conv is not None and self._raw(conv).shape[-1] != 1

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{self.path}: index names missing shards: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no .safetensors weights found")
        return files

    def _arrays(self, f: Path) -> dict[str, mx.array]:
        if f not in self._files:
            try:
                self._files[f] = mx.load(str(f))  # lazy: nothing is read until used
            except (RuntimeError, ValueError, OSError) as e:  # truncated or corrupt: say so in one line
                raise ModelLoadError(f"{f}: cannot read these weights (an incomplete download or a corrupt "
                                     f"file? re-download or re-convert it): {e}") from None
        return self._files[f]

    def _raw(self, ck: str) -> mx.array:
        f, key = self._where[ck]
        return self._arrays(f)[key]

    @property
    def keys(self) -> list[str]:
        return list(self._where)

    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.") for k in self._where)

    def _plan(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Each MLX-layout canonical key -> (how it is made, the checkpoint keys it is made of)."""
        if self._made is None:
            plan: dict[str, tuple[str, tuple[str, ...]]] = {}
            experts: dict[tuple[str, str], dict[int, str]] = {}
            shards: dict[str, dict[int, str]] = {}
            for ck in self._where:
                if ck.endswith(SCALE_SUFFIXES):
                    continue  # an FP8 weight's scales: applied to that weight when it is read
                m = _NGRAM_SHARD.match(ck)
                if m:
                    shards.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = ck
                    continue
                m = _PER_EXPERT.match(ck)
                if m:
                    experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = ck
                elif ck.endswith(".experts.gate_up_proj"):
                    base = ck[: -len(".experts.gate_up_proj")]
                    plan[f"{base}.switch_mlp.gate_proj.weight"] = ("gate", (ck,))
                    plan[f"{base}.switch_mlp.up_proj.weight"] = ("up", (ck,))
                elif ck.endswith(".experts.down_proj"):
                    plan[ck.replace(".experts.down_proj", ".switch_mlp.down_proj.weight")] = ("as_is", (ck,))
                else:
                    plan[ck] = ("layout", (ck,))
            for (base, proj), per in experts.items():
                n = max(per) + 1
                plan[f"{base}.switch_mlp.{proj}_proj.weight"] = (
                    "stack", tuple(per.get(e, f"{base}.experts.{e}") for e in range(n)))
            for key, per in shards.items():
                plan[key] = ("concat", tuple(per.get(i, f"{key}.shard_{i}") for i in range(max(per) + 1)))
            self._made = plan
        return self._made

    def _build(self, key: str, read: Callable[[str], mx.array]) -> mx.array:
        how, sources = self._plan()[key]

        def fetch(ck: str) -> mx.array:
            v = read(ck)
            if v.dtype == mx.uint8:      # an FP8 release's bytes
                m = _NGRAM_SHARD.match(ck)
                v = self._from_fp8(ck, v, m.group(1) if m else None)
            return v
        if how == "concat":
            missing = [s for s in sources if s not in self._where]
            if missing:
                raise ModelLoadError(f"{key}: n-gram table shards {[s.rsplit('_', 1)[-1] for s in missing]} missing")
            return mx.concatenate([fetch(s) for s in sources], axis=0)
        if how == "stack":
            missing = [s for s in sources if s not in self._where]
            if missing:
                base = key.rsplit(".switch_mlp.", 1)[0]
                raise ModelLoadError(f"{base}: experts {[int(s.rsplit('.', 1)[1]) for s in missing]} missing")
            return mx.stack([fetch(s) for s in sources])
        v = fetch(sources[0])
        if how in ("gate", "up"):
            mid = v.shape[-2] // 2
            return v[..., :mid, :] if how == "gate" else v[..., mid:, :]
        if how == "layout" and self.raw_layout:
            if key.endswith("conv1d.weight") and v.shape[-1] != 1:
                v = v.moveaxis(2, 1)
            elif _is_shifted_norm(key, v):
                v = v + 1.0
        return v

    def tensors(self, want: Callable[[str], bool]) -> dict[str, mx.array]:
        """The canonical tensors whose key satisfies `want`, converted to the MLX layout."""
        return {k: self._build(k, self._raw) for k in self._plan() if want(k)}

    def output_keys(self) -> list[str]:
        """Every canonical key `tensors` / `take` can produce."""
        return list(self._plan())

    def shape(self, key: str) -> tuple[int, ...]:
        """A canonical tensor's shape, read from the file headers (no data is read)."""
        return tuple(self._build(key, self._raw).shape)

    def take(self, key: str) -> mx.array:
        """One canonical tensor, lazily, holding no other reference to its data: once the
        caller drops what it computed from it, its memory is free (conversion, tensor by tensor)."""
        return self._build(key, self._take)

    def _take(self, ck: str) -> mx.array:
        f, key = self._where[ck]
        v = self._arrays(f).pop(key, None)  # a lazy array held by the cache would keep its data once read
        return v if v is not None else mx.load(str(f))[key]

    def _from_fp8(self, ck: str, v: mx.array, table: str | None) -> mx.array:
        """An FP8 release's weight (uint8 E4M3 bytes) -> bf16 with its scales."""
        if f"{ck}_scale_inv" in self._where:
            return from_block_fp8(v, self._raw(f"{ck}_scale_inv"))
        if table is not None and f"{table}.weight_scale" in self._where:
            return from_scalar_fp8(v, self._raw(f"{table}.weight_scale"))
        raise ModelLoadError(f"{ck}: 8-bit bytes without FP8 scales (neither {ck}_scale_inv nor a table scale)")

    def close(self) -> None:
        self._files.clear()


def layer_of(key: str) -> int | None:
    """Backbone layer index a canonical key belongs to, or None."""
    if key.startswith("model.layers."):
        return int(key.split(".", 3)[2])
    return None
