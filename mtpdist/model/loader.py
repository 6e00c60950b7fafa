"""Build the parts of a model a process needs and load only their weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelLoadError
from .backend import experts_to_supported_dtype
from .config import ModelConfig, read_config
from . import qwen35
from .weights import Checkpoint, canonical_key


def model_classes(config: ModelConfig):
    """(Head, LayerStack, MTPHead) of the config's architecture."""
    if config.is_qwen4_exp:
        from . import qwen4exp
        return qwen4exp.Head, qwen4exp.LayerStack, qwen4exp.MTPHead
    return qwen35.Head, qwen35.LayerStack, qwen35.MTPHead


RECONVERT_HINT = (
    "Re-convert from the original Hugging Face checkpoint, which keeps the MTP head: "
    "`mtpdist convert --hf-path <original> --mlx-path <out>` (mlx-lm's converter drops mtp.* weights)."
)


@dataclass
class ModelParts:
    """What one process holds of a model: any of head, a layer range, the MTP head."""

    config: ModelConfig
    path: Path
    head: qwen35.Head | None = None          # or the qwen4exp counterparts (same calls)
    stack: qwen35.LayerStack | None = None
    mtp: qwen35.MTPHead | None = None


def _quant_params(config: ModelConfig, canonical: str) -> dict | None:
    q = config.quantization
    if not q:
        return None
    for key, value in q.items():
        if isinstance(value, dict) and canonical_key(key) == canonical:
            return value
    return {k: q[k] for k in ("group_size", "bits", "mode") if k in q}


def mismatches(missing: list[str], extra: list[str], wrong: list[tuple]) -> list[str]:
    """What is wrong between a checkpoint and the tensors a config calls for, in words."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])}")
    if wrong:
        k, got, want = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches, e.g. {k}: weights {got}, config expects {want}")
    return problems


def load_module(module: nn.Module, weights: dict[str, mx.array], config: ModelConfig,
                to_canonical: Callable[[str], str], what: str) -> None:
    """Quantize `module` where the weights are quantized, check every shape, then load."""
    if any(k.endswith(".scales") for k in weights):
        def predicate(path, m):
            if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights:
                return False
            return _quant_params(config, to_canonical(path)) or True
        nn.quantize(module, class_predicate=predicate)
    params = dict(tree_flatten(module.parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    wrong = [(k, tuple(weights[k].shape), tuple(params[k].shape))
             for k in params if k in weights and weights[k].shape != params[k].shape]
    problems = mismatches([to_canonical(k) for k in missing], [to_canonical(k) for k in extra],
                          [(to_canonical(k), got, want) for k, got, want in wrong])
    if problems:
        raise ModelLoadError(f"{what}: checkpoint does not match config.json: " + "; ".join(problems))
    module.load_weights(list(weights.items()), strict=True)
    mx.eval(module.parameters())


def load_parts(model_dir: str | Path, *, layers: tuple[int, int] | None = None,
               head: bool = True, mtp: bool = False) -> ModelParts:
    """Load the head (embedding/norm/lm_head), layers [start, end), and/or the MTP head.

    `layers=None` loads every layer; `(0, 0)` loads none.
    """
    path = Path(model_dir)
    config, _ = read_config(path)
    ckpt = Checkpoint(path)
    parts = ModelParts(config=config, path=path)
    if mtp:
        if config.mtp_num_hidden_layers < 1:
            raise ModelLoadError(f"{path}: this model has no MTP head (mtp_num_hidden_layers is 0); run without --mtp")
        if not ckpt.has_mtp():
            raise ModelLoadError(
                f"{path}: config.json promises an MTP head (mtp_num_hidden_layers: "
                f"{config.mtp_num_hidden_layers}) but the weights hold no mtp.* tensors. {RECONVERT_HINT}")
    Head, LayerStack, MTPHead = model_classes(config)
    start, end = layers if layers is not None else (0, config.num_hidden_layers)
    if end > start:
        stack = LayerStack(config, start, end)
        prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
        w = ckpt.tensors(lambda k: k.startswith(prefixes))

        def local(k):  # model.layers.{i}.x -> layers.{i-start}.x
            _, _, i, rest = k.split(".", 3)
            return f"layers.{int(i) - start}.{rest}"

        def canon(k):
            _, i, rest = k.split(".", 2)
            return f"model.layers.{int(i) + start}.{rest}"

        load_module(stack, {local(k): v for k, v in w.items()}, config, canon, f"layers {start}-{end - 1}")
        parts.stack = stack
    if head:
        h = Head(config)
        prefixes = getattr(Head, "weight_prefixes", ("model.embed_tokens.", "model.norm.", "lm_head."))
        w = ckpt.tensors(lambda k: k.startswith(prefixes))
        if config.tie_word_embeddings:
            w = {k: v for k, v in w.items() if not k.startswith("lm_head.")}
        local = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in w.items()}
        load_module(h, local, config, lambda k: k if k.startswith("lm_head") else "model." + k, "head")
        parts.head = h
    if mtp:
        m = MTPHead(config)
        w = ckpt.tensors(lambda k: k.startswith("mtp."))
        load_module(m, {k[len("mtp."):]: v for k, v in w.items()}, config, lambda k: "mtp." + k, "MTP head")
        # A bf16 MTP head on a quantized MoE model: its experts are the only unquantized
        # MoE weights, and the CPU backend's gather_mm computes in float32 only.
        experts_to_supported_dtype(m)
        parts.mtp = m
    ckpt.close()
    return parts
