#!/usr/bin/env python3
"""MTP on MLX's CUDA backend: the "IndexError: SmallVector out of range" repro and its fix.

1. Op level: mx.quantized_matmul with a 1-D input row vs a [1, K] row, per dtype and width.
   On CUDA a 1-D row takes the qmv kernel, whose launcher reads out.shape(-2) of a 1-D output.
2. Model level: a 9B-wide model (hidden 4096, untied lm_head, vocab 248320; few layers: the
   bug is width-independent), converted with `convert -q --q-bits 4`, MTP head bf16 and
   quantized. The old drafting call (lm_head on one [H] row) must fail; speculative greedy
   decoding through the fixed Head.logits must run and equal plain greedy decoding.

usage: scripts/device_mtp_check.py OUT_JSON [LAYERS] [SIZE]   (any MLX backend; default 4 layers of size 9b)
"""

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mtpdist.engine.driver import generate  # noqa: E402
from mtpdist.engine.generate import GenerationRequest, Generator  # noqa: E402
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings  # noqa: E402
from mtpdist.worker.in_process import LocalTransport  # noqa: E402
from mtpdist.model.config import ModelConfig  # noqa: E402
from mtpdist.model.convert import ConvertOptions, convert  # noqa: E402
from mtpdist.model.loader import load_parts  # noqa: E402
from mtpdist.model.synthetic import make_config, random_weights, to_raw_hf, write_checkpoint  # noqa: E402

PROMPT = [5, 17, 99, 3, 42, 8, 200, 11, 7, 300, 12, 13, 14, 1000, 20000, 123456]
N = 24


def attempt(fn) -> str:
    try:
        mx.eval(fn())
        return "ok"
    except Exception as e:  # the point is to record which error, if any
        return f"{type(e).__name__}: {e}"


def op_level() -> dict:
    out = {}
    for N_out in (4096, 248320):
        w = mx.random.normal((N_out, 4096)).astype(mx.bfloat16)
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        for dtype in (mx.bfloat16, mx.float32):
            x = mx.random.normal((4096,)).astype(dtype)
            for name, xin in (("1d", x), ("1xK", x[None]), ("1x1xK", x[None, None])):
                out[f"N{N_out}_{str(dtype).split('.')[-1]}_{name}"] = attempt(
                    lambda: mx.quantized_matmul(xin, wq, s.astype(dtype), b.astype(dtype), transpose=True,
                                                group_size=64, bits=4))
    x = mx.random.normal((4096,)).astype(mx.bfloat16)
    w = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    out["unquantized_1d"] = attempt(lambda: x @ w.T)
    return out


def take(gen, n):
    got = []
    for step in gen:
        got.extend(step)
        if len(got) >= n:
            gen.close()
            return got[:n]


def model_level(layers: int, size: str, tmp: Path) -> dict:
    raw_cfg = make_config(size, num_layers=layers)
    t = time.time()
    weights = random_weights(ModelConfig.from_dict(raw_cfg), dtype=mx.bfloat16)
    raw = write_checkpoint(tmp / "raw", raw_cfg, to_raw_hf(weights), tokenizer=False)
    del weights
    out = {"size": size, "layers": layers, "raw_s": round(time.time() - t, 1)}
    for precision in ("bf16", "quantized"):
        r = out[f"mtp_{precision}"] = {}
        t = time.time()
        path = convert(raw, tmp / precision, ConvertOptions(quantize=True, q_bits=4, mtp_precision=precision))
        parts = load_parts(path, mtp=True)
        r["convert_load_s"] = round(time.time() - t, 1)
        head = parts.head
        lm_head = head.embed_tokens.as_linear if head.tied else head.lm_head
        r["lm_head_quantized"] = hasattr(head.embed_tokens if head.tied else head.lm_head, "scales")
        r["mtp_fc_quantized"] = hasattr(parts.mtp.fc, "scales")
        # What the drafter did before the fix: lm_head on a single [H] row.
        z = parts.mtp(parts.head.norm(parts.head.embed(mx.array([[5, 6]]))), parts.head.embed(mx.array([[6, 7]])),
                      parts.mtp.make_caches())
        r["old_call_lm_head_on_1d_row"] = attempt(lambda: lm_head(z[0, -1]))
        r["fixed_call_head_logits_on_1d_row"] = attempt(lambda: head.logits(z[0, -1]))
        prompt = tuple(t % parts.config.vocab_size for t in PROMPT)

        class Local:  # every layer in this process, through the scheduler the server runs
            t = LocalTransport(parts.stack, parts.config.hidden_size)
            transport, prepare, recover = (lambda self: self.t), (lambda self: None), (lambda self: None)
        sched = Scheduler(Generator(parts, None), Local(), SchedulerSettings(reuse_prefixes=False))
        try:
            t = time.time()
            plain = generate(sched, GenerationRequest(prompt, N, ignore_eos=True)).token_ids
            r["plain_s"] = round(time.time() - t, 2)
            t = time.time()
            spec = generate(sched, GenerationRequest(prompt, N, mtp=True, ignore_eos=True))
            r["mtp_s"] = round(time.time() - t, 2)
            r["mtp_equals_plain"] = spec.token_ids == plain
            r["drafted"], r["accepted"] = spec.drafted, spec.accepted
        except Exception:
            r["mtp_error"] = traceback.format_exc()[-1500:]
        del parts
        mx.clear_cache()
    return out


def main(out_path: str, layers: str = "4", size: str = "9b") -> None:
    result = {"mlx_version": mx.__version__, "device": str(mx.default_device()), "op_level": op_level()}
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["model_level"] = model_level(int(layers), size, Path(tmp))
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["model_level"], indent=1), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
