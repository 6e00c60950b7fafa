#!/usr/bin/env python3
"""Does a verify row (or a batched row) compute the bits a one-row step computes? (issue 17.2)

1. Op level, Qwen3.5-9B shapes, bf16 activations, 4-bit weights (group 64): each quantized
   matmul row at M=1 vs M=2..64 rows, vs padded-to-two-rows, vs a [M,1,K] batch; fp32
   activations; bf16 unquantized matmul; attention (T queries vs T one-query calls); the
   GDN depthwise conv (T=1 vs T>1, batch); RMSNorm; the compiled recurrence. Plus timings.
2. Model level, 9B-shaped random model in 4-bit (MTP head bf16), with mtpdist's row-stable
   paths off and on: step logits vs verify-row logits (bitwise, rows of depth-3 passes), a
   3-sequence batch vs each alone, greedy MTP (depth 1 and 3) vs plain greedy, and the cost
   (forward time at T=1,2,4; plain and MTP tokens/s).
3. The bundled trained demo model converted to 4-bit: MTP vs plain greedy on 6 prompts.

usage: scripts/device_row_stable.py OUT_JSON [LAYERS] [PARTS] [SIZE] [MODES]
       PARTS: ops,ops8,model,demo; SIZE: 9b; MODES: off,pad1,pad8 = MTPDIST_ROW_STABLE off/on/strict (names as in the recorded runs)
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from types import SimpleNamespace  # noqa: E402

from mtpdist.engine.driver import generate  # noqa: E402
from mtpdist.engine.generate import GenerationRequest, Generator  # noqa: E402
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings  # noqa: E402
from mtpdist.model.cache import rewind_all  # noqa: E402
from mtpdist.worker.in_process import LocalTransport  # noqa: E402
from mtpdist.model import rowstable  # noqa: E402
from mtpdist.model.cache import cache_arrays, copy_caches  # noqa: E402
from mtpdist.model.config import ModelConfig  # noqa: E402
from mtpdist.model.layers import _recurrence  # noqa: E402
from mtpdist.model.qwen35 import Head, LayerStack, MTPHead  # noqa: E402
from mtpdist.model.synthetic import make_config, random_weights  # noqa: E402

R: dict = {}
SIZE = "9b" if len(sys.argv) <= 4 else sys.argv[4]
SMOKE = SIZE != "9b"
MODE_NAMES = {"off": "off", "pad1": "on", "pad8": "strict", "on": "on", "strict": "strict"}
MODES = (sys.argv[5] if len(sys.argv) > 5 else "off,pad8").split(",")
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("row_stable.json")


def save():
    OUT.write_text(json.dumps(R, indent=1))


def eq(a, b) -> bool:
    return a.shape == b.shape and bool(mx.array_equal(a, b).item())


def diff(a, b) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item())


def timeit(fn, n=64, reps=5) -> float:
    """Median microseconds per call, `n` calls per evaluation."""
    mx.eval(fn(0))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([fn(i) for i in range(n)])
        ts.append((time.perf_counter() - t) / n * 1e6)
    return round(statistics.median(ts), 1)


def ops() -> dict:
    out = {}
    mx.random.seed(0)
    shapes = {"o_proj_4096x4096": (4096, 4096), "in_proj_qkv_8192x4096": (8192, 4096),
              "mlp_up_12288x4096": (12288, 4096), "mlp_down_4096x12288": (4096, 12288),
              "lm_head_248320x4096": (248320, 4096)}
    if SMOKE:
        shapes = {"small": (512, 256), "lm_head_small": (4096, 256)}
    for name, (N, K) in shapes.items():
        r = out[name] = {}
        copies = 1 if N > 100000 or SMOKE else 8  # cycle weights so timings are not served from L2
        ws = []
        for _ in range(copies):
            w = (0.02 * mx.random.normal((N, K))).astype(mx.bfloat16)
            ws.append(mx.quantize(w, group_size=64, bits=4))
        mx.eval(ws)
        wq, s, b = ws[0]

        def qmm(x, i=0):
            wq_, s_, b_ = ws[i % copies]
            if x.dtype != s_.dtype:
                s_, b_ = s_.astype(x.dtype), b_.astype(x.dtype)
            return mx.quantized_matmul(x, wq_, s_, b_, transpose=True,
                                       group_size=64, bits=4)
        x = mx.random.normal((64, K)).astype(mx.bfloat16)
        one = mx.concatenate([qmm(x[i:i + 1]) for i in range(64)])
        pad = mx.concatenate([qmm(mx.concatenate([x[i:i + 1]] * 2))[:1] for i in range(64)])
        mx.eval(one, pad)
        r["pad2_vs_M1"] = [eq(pad, one), diff(pad, one)]
        for M in (2, 3, 4, 8, 9, 16, 17, 32, 64):
            y = qmm(x[:M])
            r[f"M{M}"] = {"eq_M1": eq(y, one[:M]), "eq_pad2": eq(y, pad[:M]), "maxdiff_M1": diff(y, one[:M])}
        yb = qmm(x[:4].reshape(4, 1, K)).reshape(4, N)
        r["batch4x1_eq_M1"], r["batch4x1_eq_pad2"] = eq(yb, one[:4]), eq(yb, pad[:4])
        xf = x.astype(mx.float32)
        onef = mx.concatenate([qmm(xf[i:i + 1]) for i in range(8)])
        r["fp32_M4_eq_M1"] = eq(qmm(xf[:4]), onef[:4])
        r["fp32_M2pad_eq_M1"] = eq(qmm(mx.concatenate([xf[:1]] * 2))[:1], onef[:1])
        r["fp32_vs_bf16_M1_maxdiff"] = diff(onef[:4], one[:4])
        if N <= 12288:
            wd = (0.02 * mx.random.normal((N, K))).astype(mx.bfloat16)
            d1 = mx.concatenate([x[i:i + 1] @ wd.T for i in range(4)])
            r["bf16_dense_M4_eq_M1"] = eq(x[:4] @ wd.T, d1)
            r["bf16_dense_M2_eq_M1"] = eq(x[:2] @ wd.T, d1[:2])
        t = r["us_per_call"] = {}
        t["M1"] = timeit(lambda i: qmm(x[:1], i))
        t["M1_padded_to_2"] = timeit(lambda i: qmm(mx.concatenate([x[:1]] * 2), i)[:1])
        for M in (2, 4, 8):
            t[f"M{M}"] = timeit(lambda i, M=M: qmm(x[:M], i))
            t[f"M{M}_as_{M}_one_row_calls"] = timeit(lambda i, M=M: mx.concatenate([qmm(x[j:j + 1], i) for j in range(M)]))
        R["ops"] = out
        save()
        print(name, json.dumps(r), flush=True)
        ws = []  # free before the next shape
        mx.clear_cache()
    # attention: T causal queries at once vs T one-query calls over growing prefixes
    from mlx_lm.models.base import scaled_dot_product_attention as sdpa
    a = out["attention"] = {}
    for L in (40, 700):
        for T in (2, 4):
            q = mx.random.normal((1, 16, T, 256)).astype(mx.bfloat16)
            k = mx.random.normal((1, 4, L, 256)).astype(mx.bfloat16)
            v = mx.random.normal((1, 4, L, 256)).astype(mx.bfloat16)
            full = sdpa(q, k, v, cache=None, scale=256**-0.5, mask="causal")
            rows = mx.concatenate([sdpa(q[:, :, i:i + 1], k[:, :, :L - T + i + 1], v[:, :, :L - T + i + 1],
                                        cache=None, scale=256**-0.5, mask=None) for i in range(T)], axis=2)
            a[f"L{L}_T{T}"] = {"eq": eq(full, rows), "maxdiff": diff(full, rows)}
        a[f"L{L}_us_T4"] = timeit(lambda i: sdpa(q, k, v, cache=None, scale=256**-0.5, mask="causal"))
        a[f"L{L}_us_T4_rowwise"] = timeit(lambda i: mx.concatenate(
            [sdpa(q[:, :, j:j + 1], k[:, :, :L - 4 + j + 1], v[:, :, :L - 4 + j + 1], cache=None,
                  scale=256**-0.5, mask=None) for j in range(4)], axis=2))
    # GDN conv (depthwise, K=4, C=8192), RMSNorm, the compiled recurrence
    c = out["conv"] = {}
    C = 8192
    conv = nn.Conv1d(C, C, 4, groups=C, bias=False)
    conv.set_dtype(mx.bfloat16)
    xin = mx.random.normal((3, 3 + 4, C)).astype(mx.bfloat16)
    full = conv(xin)  # [3, 4, C]
    per = mx.concatenate([conv(xin[:, i:i + 4]) for i in range(4)], axis=1)
    solo = mx.concatenate([conv(xin[j:j + 1]) for j in range(3)], axis=0)
    c["T4_vs_T1"] = [eq(full, per), diff(full, per)]
    c["batch3_vs_alone"] = [eq(full, solo), diff(full, solo)]
    xr = mx.random.normal((8, 4096)).astype(mx.bfloat16)
    wr = mx.ones((4096,), dtype=mx.bfloat16)
    out["rms_norm_M8_eq_M1"] = eq(mx.fast.rms_norm(xr, wr, 1e-6),
                                  mx.concatenate([mx.fast.rms_norm(xr[i:i + 1], wr, 1e-6) for i in range(8)]))
    B, Hv, Hk, Dk, Dv = 1, 32, 16, 128, 128
    qq = mx.random.normal((B, 2, Hk, Dk)).astype(mx.bfloat16)
    kk = mx.random.normal((B, 2, Hk, Dk)).astype(mx.bfloat16)
    vv = mx.random.normal((B, 2, Hv, Dv)).astype(mx.bfloat16)
    aa = mx.random.normal((B, 2, Hv)).astype(mx.bfloat16)
    bb = mx.random.normal((B, 2, Hv)).astype(mx.bfloat16)
    A_log, dt = mx.random.normal((Hv,)), mx.random.normal((Hv,)).astype(mx.bfloat16)
    st0 = mx.random.normal((B, Hv, Dv, Dk))
    y2, _, s2 = _recurrence(qq, kk, vv, aa, bb, A_log, dt, st0)
    ya, sa = _recurrence(qq[:, :1], kk[:, :1], vv[:, :1], aa[:, :1], bb[:, :1], A_log, dt, st0)
    yb_, sb = _recurrence(qq[:, 1:], kk[:, 1:], vv[:, 1:], aa[:, 1:], bb[:, 1:], A_log, dt, sa)
    out["recurrence_T2_vs_two_T1"] = eq(y2, mx.concatenate([ya, yb_], axis=1)) and eq(s2, sb)
    R["ops"] = out
    save()
    return out


def ops8() -> dict:
    """Rows of M >= 8 (tiled kernel) vs each row padded to 8; bf16 dense likewise; timings."""
    out = R.setdefault("ops8", {})
    mx.random.seed(1)
    shapes = {"o_proj_4096x4096": (4096, 4096), "mlp_down_4096x12288": (4096, 12288),
              "lm_head_248320x4096": (248320, 4096)}
    if SMOKE:
        shapes = {"small": (512, 256)}
    for name, (N, K) in shapes.items():
        r = out[name] = {}
        w = (0.02 * mx.random.normal((N, K))).astype(mx.bfloat16)
        wq, s_, b_ = mx.quantize(w, group_size=64, bits=4)
        qmm = lambda x: mx.quantized_matmul(x, wq, s_, b_, transpose=True, group_size=64, bits=4)  # noqa: E731
        x = mx.random.normal((256, K)).astype(mx.bfloat16)
        z7 = mx.zeros((7, K), dtype=mx.bfloat16)
        ref = mx.concatenate([qmm(mx.concatenate([x[i:i + 1], z7]))[:1] for i in range(256)])
        mx.eval(ref)
        for M in (8, 9, 12, 16, 17, 24, 32, 33, 64, 65, 128, 256):
            y = qmm(x[:M])
            r[f"M{M}_eq_pad8"] = eq(y, ref[:M])
        if N <= 12288:
            dref = mx.concatenate([(mx.concatenate([x[i:i + 1], z7]) @ w.T)[:1] for i in range(64)])
            r["bf16_dense_eq_pad8"] = {M: eq(x[:M] @ w.T, dref[:M]) for M in (8, 9, 16, 17, 32, 64)}
            d1 = mx.concatenate([x[i:i + 1] @ w.T for i in range(8)])
            r["bf16_dense_pad8_eq_M1"] = eq(dref[:8], d1)
        save()
        print(name, json.dumps(r), flush=True)
        w = wq = s_ = b_ = None  # free before the next shape
        mx.clear_cache()
    return out


def build(layers: int):
    raw = make_config(SIZE, num_layers=layers)
    cfg = ModelConfig.from_dict(raw)
    w = random_weights(cfg, dtype=mx.bfloat16)
    head, stack, mtp = Head(cfg), LayerStack(cfg, 0, layers), MTPHead(cfg)
    head.load_weights([(k[len("model."):] if k.startswith("model.") else k, v) for k, v in w.items()
                       if k.startswith(("model.embed", "model.norm", "lm_head"))])
    stack.load_weights([(k[len("model."):], v) for k, v in w.items() if k.startswith("model.layers.")])
    mtp.load_weights([(k[len("mtp."):], v) for k, v in w.items() if k.startswith("mtp.")])
    del w
    nn.quantize(head, group_size=64, bits=4)
    nn.quantize(stack, group_size=64, bits=4)
    mx.eval(head.parameters(), stack.parameters(), mtp.parameters())
    mx.clear_cache()
    return cfg, head, stack, mtp


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


class LocalTrunk:
    """A LayerStack with one sequence's caches (model-level passes)."""

    def __init__(self, stack):
        self.stack, self.caches = stack, stack.make_caches()

    def forward(self, hidden, keep=()):
        return self.stack.ragged(hidden, [(self.caches, hidden.shape[1], tuple(keep))])

    def rewind(self, n):
        rewind_all(self.caches, n)


def decode(parts, prompt, n, depth=0):
    """Greedy decoding through the scheduler the server runs (plain, or MTP at `depth`)."""
    class Local:
        t = LocalTransport(parts.stack, parts.config.hidden_size)
        transport, prepare, recover = (lambda self: self.t), (lambda self: None), (lambda self: None)
    sched = Scheduler(Generator(parts, None), Local(), SchedulerSettings(reuse_prefixes=False))
    return generate(sched, GenerationRequest(tuple(prompt), n, mtp=depth > 0, mtp_depth=max(depth, 1),
                                             ignore_eos=True))


def prefilled(head, stack, prompt):
    tr = LocalTrunk(stack)
    mx.eval(tr.forward(head.embed(mx.array([prompt[:-1]]))))
    return tr


def logits_rows(head, hidden):
    return head.logits(head.norm(hidden)[0])


def model_level(layers: int) -> dict:
    out = R.setdefault("model", {})
    t = time.time()
    cfg, head, stack, mtp = build(layers)
    out["layers"], out["build_s"] = layers, round(time.time() - t, 1)
    V = cfg.vocab_size
    prompts = [[(97 * p + 31 * i * i + 7) % V for i in range(24 + 4 * p)] for p in range(4)]
    P = SimpleNamespace(head=head, stack=stack, mtp=mtp, config=cfg)
    N = 48
    for mode in MODES:
        rowstable.set_mode(MODE_NAMES[mode])
        r = out[mode] = {}
        # step logits vs verify-row logits (4-row passes over plain's own tokens)
        same = rows = 0
        worst = 0.0
        for prompt in prompts[:2]:
            plain = list(decode(P, prompt, 16).token_ids)
            seq = [prompt[-1]] + plain
            a = prefilled(head, stack, prompt)
            step_logits = []
            for tok in seq[:16]:
                step_logits.append(head.logits(head.norm(a.forward(head.embed(mx.array([[tok]]))))[0, -1]))
            b = prefilled(head, stack, prompt)
            for s in range(0, 16, 4):
                lg = logits_rows(head, b.forward(head.embed(mx.array([seq[s:s + 4]])), (1, 2, 3)))
                for j in range(4):
                    rows += 1
                    same += eq(lg[j], step_logits[s + j])
                    worst = max(worst, diff(lg[j], step_logits[s + j]))
        r["verify_rows_equal_step"] = f"{same}/{rows}"
        r["verify_rows_max_logit_diff"] = worst
        # a batch of 3 decode rows vs each sequence alone (hidden and logits)
        trunks = [prefilled(head, stack, p) for p in prompts[:3]]
        toks = [p[-1] for p in prompts[:3]]
        alone = []
        for tr, tok in zip(trunks, toks):
            c = copy_caches(tr.caches)
            alone.append(stack.ragged(head.embed(mx.array([[tok]])), [(c, 1, ())]))
        hb = stack.ragged(head.embed(mx.array([toks])), [(tr.caches, 1, ()) for tr in trunks])
        ha = mx.concatenate(alone, axis=1)
        r["batch3_hidden_equal_alone"] = eq(hb, ha)
        r["batch3_logits_equal_alone"] = eq(logits_rows(head, hb),
                                            mx.concatenate([head.logits(head.norm(h[0, -1])) [None] for h in alone]))
        many = [[(13 * q + 5 * i + 3) % V for i in range(20)] for q in range(12)]
        trunks = [prefilled(head, stack, p) for p in many]
        toks = [p[-1] for p in many]
        alone = []
        for tr, tok in zip(trunks, toks):
            c = copy_caches(tr.caches)
            alone.append(logits_rows(head, stack.ragged(head.embed(mx.array([[tok]])), [(c, 1, ())])))
        hb = stack.ragged(head.embed(mx.array([toks])), [(tr.caches, 1, ()) for tr in trunks])
        r["batch12_logits_equal_alone"] = eq(logits_rows(head, hb), mx.concatenate(alone))
        # greedy MTP vs plain
        parts = {}
        for prompt in prompts:
            plain = list(decode(P, prompt, N).token_ids)
            for d in (1, 3):
                spec = list(decode(P, prompt, N, d).token_ids)
                parts.setdefault(f"depth{d}_first_diff", []).append(first_diff(plain, spec))
        r.update(parts)
        # cost: one forward (trunk + norm + lm_head) at T rows, and tokens/s
        tr = prefilled(head, stack, prompts[0])
        for T in (1, 2, 4, 8):
            ts = []
            for _ in range(12):
                c = LocalTrunk(stack)
                c.caches = copy_caches(tr.caches)
                mx.eval(cache_arrays(c.caches))
                t0 = time.perf_counter()
                mx.eval(logits_rows(head, c.forward(head.embed(mx.array([prompts[0][:T]])), tuple(range(1, T)))))
                ts.append(time.perf_counter() - t0)
            r[f"forward_T{T}_ms"] = round(statistics.median(ts[2:]) * 1e3, 2)
        t0 = time.perf_counter()
        decode(P, prompts[0], 64)
        r["plain_tok_s"] = round(64 / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        decode(P, prompts[0], 64, 1)
        r["mtp_d1_tok_s_random_head"] = round(64 / (time.perf_counter() - t0), 1)
        save()
        print(json.dumps(r), flush=True)
    rowstable.set_mode(None)
    return out


def demo() -> dict:
    from mtpdist.model.convert import ConvertOptions, convert
    from mtpdist.model.loader import load_parts
    from transformers import AutoTokenizer
    src = Path(__file__).resolve().parent.parent / "mtpdist" / "demo_model"
    out = R.setdefault("demo_4bit", {})
    tok = AutoTokenizer.from_pretrained(str(src))
    texts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\nimport sys\n\ndef main():",
             "for i in range(10):", "def quicksort(arr):\n    if len(arr) <= 1:", "# read a file\nwith open("]
    with tempfile.TemporaryDirectory() as tmp:
        path = convert(src, Path(tmp) / "q4", ConvertOptions(quantize=True, q_bits=4))
        parts = load_parts(path, mtp=True)
        for mode in MODES:
            rowstable.set_mode(MODE_NAMES[mode])
            r = out[mode] = {}
            for text in texts:
                prompt = tok.encode(text)
                plain = list(decode(parts, prompt, 96).token_ids)
                for d in (1, 3):
                    spec = decode(parts, prompt, 96, d)
                    r.setdefault(f"depth{d}_first_diff", []).append(first_diff(plain, list(spec.token_ids)))
                r.setdefault("accepted_d1", []).append(spec.accepted)
            save()
            print(json.dumps(r), flush=True)
    rowstable.set_mode(None)
    return out


def main():
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    want = (sys.argv[3] if len(sys.argv) > 3 else "ops,model,demo").split(",")
    R.update(mlx=mx.__version__, device=str(mx.default_device()), row_stable_default=rowstable.mode())
    for part, fn in (("ops", ops), ("ops8", ops8), ("model", lambda: model_level(layers)), ("demo", demo)):
        if part in want:
            t = time.time()
            try:
                fn()
            except Exception:
                import traceback
                R[f"{part}_error"] = traceback.format_exc()[-3000:]
                print(R[f"{part}_error"], flush=True)
            R[f"{part}_s"] = round(time.time() - t, 1)
            save()
    print(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
