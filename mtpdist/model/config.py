"""Model configuration: what a checkpoint's config.json says, parsed once and frozen."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm.models.qwen3_5 import TextModelArgs

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text")
QWEN4_EXP_TYPES = ("qwen4_exp", "qwen4_exp_text")
# qwen4_exp rows between stages carry each token's id in this many base-256 digit columns.
ID_COLS = 3


@dataclass(frozen=True)
class ModelConfig:
    """The text model's shape, plus what mtpdist needs to know about the checkpoint.

    `hidden_size` is the width of the rows a stage takes and returns: the model width for
    Qwen3.5/3.6; for qwen4_exp, hc_count streams of it plus ID_COLS token-id columns
    (`text_config["hidden_size"]` is the model width for both).
    """

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    full_attention_interval: int
    num_experts: int
    mtp_num_hidden_layers: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    quantization: dict | None
    text_config: dict = field(repr=False, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_qwen4_exp(self) -> bool:
        """Qwen3.8-Flash-Next's architecture (hyper-connections, indexer, n-gram embedding)."""
        return self.model_type in QWEN4_EXP_TYPES or self.text_config.get("model_type") in QWEN4_EXP_TYPES

    def is_linear(self, layer: int) -> bool:
        """True for a GatedDeltaNet layer, False for a full-attention layer."""
        types = self.text_config.get("layer_types")
        if types and len(types) == self.num_hidden_layers:
            return types[layer] == "linear_attention"
        return (layer + 1) % self.full_attention_interval != 0

    def text_args(self) -> TextModelArgs:
        """mlx-lm's argument object, used to build the layers we compose."""
        return TextModelArgs.from_dict(dict(self.text_config))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parse a config.json dict (text_config nested or not), refusing other architectures."""
        model_type = raw.get("model_type", "")
        text = dict(raw.get("text_config") or raw)
        if model_type not in SUPPORTED_MODEL_TYPES and text.get("model_type") not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(raw.get("architectures", [])) or "none given"
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} (architectures: {archs}); "
                f"mtpdist runs Qwen3.5/3.6/3.8 checkpoints ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        # Top-level fields that the text config sometimes only inherits.
        for key in ("tie_word_embeddings", "vocab_size", "eos_token_id"):
            if key not in text and key in raw:
                text[key] = raw[key]
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in text]
        if missing:
            raise ModelLoadError(f"config.json lacks {', '.join(missing)}")
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        width = int(text["hidden_size"])
        if model_type in QWEN4_EXP_TYPES or text.get("model_type") in QWEN4_EXP_TYPES:
            width = int(text.get("hc_count", 4)) * width + ID_COLS
        return cls(
            model_type=model_type or text.get("model_type", ""),
            hidden_size=width,
            num_hidden_layers=int(text["num_hidden_layers"]),
            vocab_size=int(text["vocab_size"]),
            full_attention_interval=int(text.get("full_attention_interval", 4)),
            num_experts=int(text.get("num_experts", 0) or 0),
            mtp_num_hidden_layers=int(text.get("mtp_num_hidden_layers", 0) or 0),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            quantization=raw.get("quantization") or raw.get("quantization_config"),
            text_config=text,
        )


def read_config(model_dir: str | Path) -> tuple[ModelConfig, dict]:
    """Read `config.json` from a model folder; returns the parsed config and the raw dict."""
    folder = Path(model_dir)
    if not folder.exists():
        raise ModelLoadError(f"{model_dir}: no such file or folder")
    if not folder.is_dir():
        raise ModelLoadError(f"{model_dir}: is a file; give the model's folder (config.json, safetensors, tokenizer)")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (is this a model folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    return ModelConfig.from_dict(raw), raw
