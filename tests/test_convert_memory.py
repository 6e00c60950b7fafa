"""`mtpdist convert` holds one tensor and one output shard, not the checkpoint (issue 17.7).

A ~0.5 GB float32 checkpoint in 4 shards is converted to 4-bit by the real CLI in a
subprocess, which reports its peak resident memory (VmHWM); it must stay below the same
CLI's peak on a tiny model plus half the checkpoint. The old converter loaded everything
(peak above baseline + the whole checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mtpdist.model.config import ModelConfig
from mtpdist.model.qwen35 import Head, LayerStack, MTPHead
from mtpdist.model.synthetic import make_config

PEAK = """
import sys
from mtpdist.cli import main
try:
    main(sys.argv[1:])
finally:
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    print('PEAK_KB', hwm, file=sys.stderr)
"""


def _write_big(out, shards=4):
    """A float32 checkpoint in the MLX key layout (config: medium widths, vocab 8192, 6 layers)."""
    raw = make_config("medium", num_layers=6, vocab_size=8192)
    cfg = ModelConfig.from_dict(raw)
    keys = []
    for prefix, m in (("model.", Head(cfg)), ("model.", LayerStack(cfg, 0, 6)), ("mtp.", MTPHead(cfg))):
        keys += [(prefix + k if not k.startswith("lm_head") else k, tuple(v.shape)) for k, v in tree_flatten(m.parameters())]
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: mx.array(rng.standard_normal(shape, dtype=np.float32) * 0.02) for k, shape in keys[i::shards]}
        mx.save_safetensors(str(out / name), part)
        weight_map.update({k: name for k in part})
        total += sum(v.nbytes for v in part.values())
        del part
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def _peak_kb(src, dst) -> int:
    p = subprocess.run([sys.executable, "-c", PEAK, "convert", "--hf-path", str(src), "--mlx-path", str(dst), "-q"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stderr.split("PEAK_KB")[-1].split()[0])


def test_convert_peak_memory_stays_below_half_the_checkpoint(tmp_path, tiny_dense):
    total = _write_big(tmp_path / "big")
    assert total > 400e6
    base = _peak_kb(tiny_dense[0], tmp_path / "tiny_out")
    peak = _peak_kb(tmp_path / "big", tmp_path / "big_out")
    assert (peak - base) * 1024 < total / 2, f"peak {peak} KB vs baseline {base} KB for a {total / 1e6:.0f} MB checkpoint"
    out = mx.load(str(tmp_path / "big_out" / "model.safetensors"))
    assert out["language_model.model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32  # quantized, MTP kept
    assert any(k.startswith("mtp.") for k in out)
