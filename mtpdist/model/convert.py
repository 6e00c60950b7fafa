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
from tqdm import tqdm

from ..errors import ModelLoadError
from .config import read_config
from .loader import RECONVERT_HINT, mismatches, model_classes
from .weights import Checkpoint

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
    max_shard_bytes: int = 5 << 30    # output shard size (mlx-lm's); also what conversion holds in memory


def _cast(path: str, v: mx.array, dtype) -> mx.array:
    """The dtype rule of a converted tensor: floats to `dtype`, except A_log (kept fp32)."""
    return v if (path.endswith("A_log") or not mx.issubdtype(v.dtype, mx.floating)) else v.astype(dtype)


def _tree_cast(tree, dtype):
    from mlx.utils import tree_map_with_path
    return tree_map_with_path(lambda p, v: _cast(p, v, dtype), tree)


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions) -> Path:
    """Read `src` (raw HF or MLX layout), write an MLX checkpoint with the MTP head to `dst`.

    Tensor by tensor: each is read, cast and quantized, then added to the output shard being
    filled, which is written once full; memory stays near one output shard (at most 5 GB, as
    mlx-lm shards) plus the tensor in hand, whatever the checkpoint's size.
    """
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
    ckpt = Checkpoint(src)
    if want_mtp and not ckpt.has_mtp():
        raise ModelLoadError(
            f"{src}: config.json promises an MTP head (mtp_num_hidden_layers: {config.mtp_num_hidden_layers}) "
            f"but the weights hold no mtp.* tensors. {RECONVERT_HINT}")
    parts = _skeletons(config, want_mtp, dtype, opts)
    _check(ckpt, parts, config)
    quant_overrides = {}
    for part in parts:
        part.plan_quantization(opts, quant_overrides)
    total = sum(v.nbytes for part in parts for _, v in part.outputs())
    writer = _ShardWriter(dst, opts.max_shard_bytes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None) as bar:
        for part in parts:
            for key, v in part.convert(ckpt):
                writer.add(key, v)
                bar.update(v.nbytes)
    ckpt.close()
    writer.close(raw_cfg, opts, dtype_name, quant_overrides)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def _skeletons(config, want_mtp: bool, dtype, opts: ConvertOptions) -> list["_Part"]:
    """The model's modules, their parameters never computed (lazy): they give each output's
    key, order, shape and dtype, and the module type that quantizes it."""
    Head, LayerStack, MTPHead = model_classes(config)
    parts = [_Part("language_model.model.", Head(config), dtype, opts.quantize),
             _Part("language_model.model.layers.", LayerStack(config, 0, config.num_hidden_layers), dtype,
                   opts.quantize)]
    if want_mtp:
        mtp_dtype = {"bf16": mx.bfloat16, "fp16": mx.float16, "quantized": dtype}[opts.mtp_precision]
        parts.append(_Part("mtp.", MTPHead(config), mtp_dtype, opts.quantize and opts.mtp_precision == "quantized"))
    return parts


class _Part:
    """One module (head, layer stack, MTP head) of the output: what it holds and how to make it."""

    def __init__(self, prefix: str, module: nn.Module, dtype, quantize: bool):
        self.prefix, self.module, self.dtype, self.quantize = prefix, module, dtype, quantize
        self.expected = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}
        self.leaves: dict[str, nn.Module] = {}
        self.quantized: dict[str, dict] = {}

    def canonical(self, local: str) -> str:
        """Checkpoint (canonical) key of a parameter path of this module."""
        if self.prefix == "mtp.":
            return "mtp." + local
        if self.prefix == "language_model.model.layers.":
            return "model." + local
        return local if local.startswith("lm_head") else "model." + local

    def plan_quantization(self, opts: ConvertOptions, overrides: dict) -> None:
        """Cast and quantize the skeleton (lazily) as the weights will be, keeping its unquantized leaves."""
        self.module.update(_tree_cast(self.module.parameters(), self.dtype))
        if not self.quantize:
            return
        self.leaves = dict(tree_flatten(self.module.leaf_modules(), is_leaf=nn.Module.is_module))

        def predicate(path, mod):
            rule = quant_rule(path, mod, opts)
            if rule is False:
                return False
            if isinstance(rule, dict):
                overrides[_full(self.prefix, path)] = rule
                self.quantized[path] = dict(rule)
            else:
                self.quantized[path] = {"group_size": opts.q_group_size, "bits": opts.q_bits, "mode": "affine"}
            return self.quantized[path]

        nn.quantize(self.module, class_predicate=predicate)

    def outputs(self):
        """(local key, lazy skeleton array) of every output tensor, in the order written."""
        return tree_flatten(self.module.parameters())

    def convert(self, ckpt: Checkpoint):
        """Yield (output key, computed tensor) one at a time, reading each source tensor once."""
        done: dict[str, mx.array] = {}
        for local, _ in self.outputs():
            if local not in done:
                owner = local.rsplit(".", 1)[0]
                if owner in self.quantized:
                    done.update(self._quantize(owner, ckpt))
                else:
                    done[local] = _cast(local, ckpt.take(self.canonical(local)), self.dtype)
                mx.eval(list(done.values()))
            yield _full(self.prefix, local), done.pop(local)
            mx.clear_cache()

    def _quantize(self, path: str, ckpt: Checkpoint) -> dict[str, mx.array]:
        leaf = self.leaves[path]
        own = leaf.parameters()
        leaf.update({k: _cast(f"{path}.{k}", ckpt.take(self.canonical(f"{path}.{k}")), self.dtype)
                     for k in own})
        q = leaf.to_quantized(**self.quantized[path])
        leaf.update(own)  # drop the real weights: the quantized ones are all that is kept
        return {f"{path}.{k}": v for k, v in tree_flatten(q.parameters())}


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


def _check(ckpt: Checkpoint, parts: list[_Part], config) -> None:
    """Every tensor the config calls for is in the checkpoint with its shape (headers only)."""
    have = set(ckpt.output_keys())
    problems = []
    for part in parts:
        want = {part.canonical(k): shape for k, shape in part.expected.items()}
        if part.prefix == "mtp.":
            mine = {k for k in have if k.startswith("mtp.")}
        elif part.prefix.endswith("layers."):
            mine = {k for k in have if k.startswith("model.layers.")}
        else:   # the head: embedding, final norm (or mixer), lm_head
            mine = {k for k in have if not k.startswith(("model.layers.", "mtp."))}
        wrong = [(k, ckpt.shape(k), want[k]) for k in want if k in mine and ckpt.shape(k) != want[k]]
        problems += mismatches(sorted(set(want) - mine), sorted(mine - set(want)), wrong)
    if problems:
        raise ModelLoadError(f"{ckpt.path}: checkpoint does not match config.json: " + "; ".join(problems))


def _full(prefix: str, path: str) -> str:
    if prefix == "language_model.model.layers.":
        return prefix + path[len("layers."):]
    if prefix == "language_model.model." and path.startswith("lm_head"):
        return "language_model." + path
    return prefix + path


class _ShardWriter:
    """Output shards filled in order and written as each fills (mlx-lm's sharding rule:
    a tensor that would take a shard past the limit starts the next one)."""

    def __init__(self, dst: Path, max_bytes: int):
        dst.mkdir(parents=True, exist_ok=True)
        self.dst, self.max_bytes = dst, max_bytes
        self.shard: dict[str, mx.array] = {}
        self.size = self.total = 0
        self.names: list[list[str]] = []

    def add(self, key: str, v: mx.array) -> None:
        if self.size + v.nbytes > self.max_bytes:
            self._flush()
        self.shard[key] = v
        self.size += v.nbytes
        self.total += v.nbytes

    def _flush(self) -> None:
        mx.save_safetensors(str(self._partial(len(self.names))), self.shard, metadata={"format": "mlx"})
        self.names.append(list(self.shard))
        self.shard, self.size = {}, 0
        mx.clear_cache()

    def _partial(self, i: int) -> Path:
        return self.dst / f"model-{i + 1:05d}.partial.safetensors"  # renamed once the count is known

    def close(self, raw_cfg: dict, opts: ConvertOptions, dtype_name: str, overrides: dict) -> None:
        """Write the last shard, name the shards, then the index and config.json."""
        self._flush()
        n = len(self.names)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
        weight_map = {}
        for i, keys in enumerate(self.names):
            name = fmt.format(i + 1, n)
            self._partial(i).replace(self.dst / name)
            weight_map.update({k: name for k in keys})
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        cfg = dict(raw_cfg)
        if opts.quantize:
            q = {"group_size": opts.q_group_size, "bits": opts.q_bits, "mode": "affine", **overrides}
            cfg["quantization"] = q
            cfg["quantization_config"] = q
        cfg["mtpdist"] = {"converted": True, "dtype": dtype_name, "mtp_precision": opts.mtp_precision}
        (self.dst / "config.json").write_text(json.dumps(cfg, indent=2))
