"""Convert a Hugging Face Qwen3.5/3.6 checkpoint to MLX layout, keeping the MTP head.

Output keys follow mlx-lm's layout (`language_model.*`), so mlx-lm loads the result too
(it ignores `mtp.*`); the MTP head is stored as `mtp.*` at the chosen precision.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import make_shards
from tqdm import tqdm

from ..errors import ModelLoadError
from .config import read_config
from .loader import load_parts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass(frozen=True)
class ConvertOptions:
    """Choices of `mtpdist convert`."""
    dtype: str | None = None          # None: the checkpoint's own torch_dtype
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    mtp_precision: str = "bf16"       # bf16 | fp16 | quantized
    force: bool = False               # write into a folder that already holds files


def _tree_cast(tree, dtype):
    from mlx.utils import tree_map_with_path
    return tree_map_with_path(
        lambda p, v: v if (p.endswith("A_log") or not mx.issubdtype(v.dtype, mx.floating)) else v.astype(dtype), tree)


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions) -> Path:
    """Read `src` (raw HF or MLX layout), write an MLX checkpoint with the MTP head to `dst`."""
    src, dst = Path(src), Path(dst)
    if opts.mtp_precision not in ("bf16", "fp16", "quantized"):
        raise ModelLoadError(f"--mtp-precision must be bf16, fp16 or quantized, not {opts.mtp_precision!r}")
    if opts.q_bits not in (2, 3, 4, 5, 6, 8):
        raise ModelLoadError(f"--q-bits {opts.q_bits} is not supported (use 4 or 8)")
    config, raw_cfg = read_config(src)
    if dst.resolve() == src.resolve():
        raise ModelLoadError(f"{dst} is the checkpoint being converted; write somewhere else")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not opts.force:
        raise ModelLoadError(f"{dst} already exists and is not empty; choose another --mlx-path or pass --force "
                             "to overwrite")
    if config.quantization and config.quantization.get("quant_method") != "fp8":   # FP8 is read as bf16
        raise ModelLoadError(f"{src} is already quantized; convert from the original checkpoint")
    text = raw_cfg.get("text_config", raw_cfg)
    dtype_name = opts.dtype or text.get("torch_dtype") or raw_cfg.get("torch_dtype") or "bfloat16"
    if dtype_name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype_name!r} (choose from {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    want_mtp = config.mtp_num_hidden_layers > 0
    parts = load_parts(src, mtp=want_mtp)
    modules = {"language_model.model.": parts.head, "language_model.model.layers.": parts.stack}
    quant_overrides = {}
    for m in modules.values():
        m.update(_tree_cast(m.parameters(), dtype))
    if parts.mtp is not None:
        mtp_dtype = {"bf16": mx.bfloat16, "fp16": mx.float16, "quantized": dtype}[opts.mtp_precision]
        parts.mtp.update(_tree_cast(parts.mtp.parameters(), mtp_dtype))
        modules["mtp."] = parts.mtp
    if opts.quantize:
        for prefix, m in modules.items():
            if prefix == "mtp." and opts.mtp_precision != "quantized":
                continue

            def predicate(path, mod, prefix=prefix):
                rule = quant_rule(path, mod, opts)
                if isinstance(rule, dict):
                    quant_overrides[_full(prefix, path)] = rule
                return rule

            nn.quantize(m, group_size=opts.q_group_size, bits=opts.q_bits, class_predicate=predicate)
    weights = {}
    for prefix, m in modules.items():
        for k, v in tree_flatten(m.parameters()):
            weights[_full(prefix, k)] = v
    if parts.head.tied:
        weights.pop("language_model.lm_head.weight", None)
    _write(dst, weights, raw_cfg, opts, dtype_name, quant_overrides)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


# Small matrices whose outputs steer whole blocks: routers, the shared-expert gate and
# qwen4_exp's hyper-connection inject weights stay at 8 bits.
EIGHT_BIT_SUFFIXES = ("mlp.gate", "shared_expert_gate", "block_inject_weight")


def quant_rule(path: str, mod, opts: ConvertOptions) -> bool | dict:
    """How `convert -q` quantizes one module: False (keep), True (the chosen bits and group), or
    explicit parameters. Rows whose width the group does not divide use group 32 where it does
    (qwen4_exp's n-gram table rows are 160 wide)."""
    if not hasattr(mod, "to_quantized"):
        return False
    width = mod.weight.shape[-1]
    group = next((g for g in (64, 32) if width % g == 0), None)
    if path.endswith(EIGHT_BIT_SUFFIXES):
        return {"group_size": group, "bits": 8} if group else False
    if width % opts.q_group_size == 0:
        return True
    return {"group_size": 32, "bits": opts.q_bits} if width % 32 == 0 else False


def _full(prefix: str, path: str) -> str:
    if prefix == "language_model.model.layers.":
        return prefix + path[len("layers."):]
    if prefix == "language_model.model." and path.startswith("lm_head"):
        return "language_model." + path
    return prefix + path


def _write(dst: Path, weights: dict, raw_cfg: dict, opts: ConvertOptions, dtype_name: str,
           overrides: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shards = make_shards(weights)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing", unit="shard", disable=len(shards) < 2)):
        name = fmt.format(i + 1, len(shards))
        mx.save_safetensors(str(dst / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = dict(raw_cfg)
    for key in ("quantization", "quantization_config"):   # an FP8 source was read as bf16
        if isinstance(cfg.get(key), dict) and cfg[key].get("quant_method") == "fp8":
            del cfg[key]
    if opts.quantize:
        q = {"group_size": opts.q_group_size, "bits": opts.q_bits, "mode": "affine", **overrides}
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    cfg["mtpdist"] = {"converted": True, "dtype": dtype_name, "mtp_precision": opts.mtp_precision}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
