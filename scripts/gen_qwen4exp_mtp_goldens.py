"""Write the qwen4_exp MTP-head golden files (run by hand, not in CI).

transformers' `qwen4_exp` has no MTP head, so the reference here is mlx-vlm's `qwen4_exp_mtp`
drafter (mlx-vlm 0.7.10). It is not a project dependency (it pulls in opencv, datasets and
more); unpack its wheel and put it on the path for this script only:

    pip download --no-deps -d /tmp/mlxvlm mlx-vlm==0.7.10 && unzip -q /tmp/mlxvlm/*.whl -d /tmp/mlxvlm/x
    .venv/bin/pip install Pillow
    PYTHONPATH=/tmp/mlxvlm/x .venv/bin/python scripts/gen_qwen4exp_mtp_goldens.py

It also runs mlx-vlm's qwen4_exp target on the golden checkpoint and prints how far its logits
are from transformers' goldens (1.8e-7 when written: the two references agree).

It writes tests/goldens/qwen4exp/mtp.safetensors: random MTP weights in the release's raw
layout (bf16; norms stored as w of (1 + w); experts fused as gate_up_proj), and
mtp_logits.safetensors: the drafter's inputs (the target's pre-mixer streams over the golden
prompt, from mtpdist, which equals transformers there) and its logits for every prompt
position, then for one chained draft fed its own pre-mixer output.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_vlm.models.qwen4_exp.config import TextConfig
from mlx_vlm.models.qwen4_exp.language import LanguageModel
from mlx_vlm.speculative.drafters.qwen4_exp_mtp.config import Qwen4ExpMTPConfig
from mlx_vlm.speculative.drafters.qwen4_exp_mtp.qwen4_exp_mtp import Qwen4ExpMTPDraftModel

from mtpdist.model.cache import rewind_all  # noqa: F401
from mtpdist.model.loader import load_parts

GOLD = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "qwen4exp"
SEED = 38


def f32(w: dict) -> dict:
    return {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()}


def check_target(text: dict) -> float:
    """Max |mlx-vlm logits - transformers goldens| over the prefill and decode steps."""
    lm = LanguageModel(TextConfig.from_dict(text))
    w, experts = {}, {}
    for k, v in f32(mx.load(str(GOLD / "checkpoint" / "model.safetensors"))).items():
        if k.endswith(("layer_multipliers", "ngram_heads_offsets", "ngram_heads_vocab_sizes")):
            continue
        m = re.match(r"(.*\.mlp)\.experts\.(\d+)\.(\w+)_proj\.weight", k)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
            continue
        k = re.sub(r"\.ngram_embedding\.shard_(\d+)", r".ngram_embedding.shards.\1", k)
        w[k] = v.moveaxis(2, 1) if "conv1d.weight" in k and v.shape[-1] != 1 else v
    for (base, proj), per in experts.items():
        w[f"{base}.switch_mlp.{proj}_proj.weight"] = mx.stack([per[i] for i in range(len(per))])
    lm.load_weights(list(w.items()), strict=False)
    inputs, ref = json.loads((GOLD / "inputs.json").read_text()), mx.load(str(GOLD / "logits.safetensors"))
    cache, off, worst = lm.make_cache(), 0, 0.0
    for name, toks in [("prefill", inputs["prompt"])] + [(f"step{i}", s) for i, s in enumerate(inputs["steps"])]:
        out = lm(mx.array([toks]), cache=cache, position_ids=mx.arange(off, off + len(toks))[None])
        off += len(toks)
        worst = max(worst, float(mx.abs(out.logits[0] - ref[name]).max()))
    return worst


def main() -> None:
    raw = json.loads((GOLD / "checkpoint" / "config.json").read_text())
    text = {k: v for k, v in raw.items() if k not in ("architectures", "layer_types")}
    drafter = Qwen4ExpMTPDraftModel(Qwen4ExpMTPConfig(text_config=TextConfig.from_dict(text)))
    mx.random.seed(SEED)
    weights = {}
    for k, v in tree_flatten(drafter.parameters()):
        scale = 0.2 if v.ndim == 1 else 0.5 / v.shape[-1] ** 0.5   # 1-D: norms, zero-centred here
        weights[k] = (scale * mx.random.normal(v.shape)).astype(mx.bfloat16)
    drafter.load_weights(list(f32(weights).items()), strict=True)
    release = {}
    for k, v in weights.items():     # the release layout: mtp.* keys, experts fused as gate_up_proj
        if ".switch_mlp." in k:
            if k.endswith("gate_proj.weight"):
                up = weights[k.replace("gate_proj", "up_proj")]
                release["mtp." + k.replace("switch_mlp.gate_proj.weight", "experts.gate_up_proj")] = \
                    mx.concatenate([v, up], axis=-2)
            elif k.endswith("down_proj.weight"):
                release["mtp." + k.replace("switch_mlp.down_proj.weight", "experts.down_proj")] = v
            continue
        release["mtp." + k] = v
    mx.save_safetensors(str(GOLD / "mtp.safetensors"), release)

    # The target's pre-mixer streams over the golden prompt (float32 copy of the checkpoint).
    tmp = Path(tempfile.mkdtemp())
    shutil.copy(GOLD / "checkpoint" / "config.json", tmp / "config.json")
    mx.save_safetensors(str(tmp / "model.safetensors"), f32(mx.load(str(GOLD / "checkpoint" / "model.safetensors"))))
    parts = load_parts(tmp)
    prompt = json.loads((GOLD / "inputs.json").read_text())["prompt"]
    x = parts.head.embed(mx.array([prompt]))
    hidden = parts.stack.ragged(x, [(parts.stack.make_caches(), x.shape[1], ())])[..., :parts.stack.width]
    nxt = mx.argmax(parts.head.logits(parts.head.norm(hidden))[0, -1]).item()
    tokens = mx.array([prompt[1:] + [nxt]])

    def lm_head(x):
        return parts.head.logits(x)

    cache = drafter.make_cache()
    drafter._next_position = 0
    mixed, streams = drafter._forward_hidden(parts.head.embed_tokens(tokens), hidden, tokens, cache)
    logits = lm_head(mixed)[0]
    draft = mx.argmax(logits[-1]).item()
    drafter._next_position = tokens.shape[1]
    chain_tok = mx.array([[draft]])
    mixed2, _ = drafter._forward_hidden(parts.head.embed_tokens(chain_tok), streams[:, -1:], chain_tok, cache)
    mx.save_safetensors(str(GOLD / "mtp_logits.safetensors"), {
        "hidden": hidden[0], "tokens": tokens[0], "logits": logits, "chain_token": chain_tok[0],
        "chain_logits": lm_head(mixed2)[0]})
    print(f"wrote {GOLD}/mtp*.safetensors; mlx-vlm target vs transformers goldens: {check_target(text):.2g}")


if __name__ == "__main__":
    main()
