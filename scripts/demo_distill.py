#!/usr/bin/env python3
"""Self-distil the demo model's MTP head on the backbone's own greedy continuations.

A draft is accepted when it equals the backbone's next greedy token, and at decode time
the context is the backbone's own output. So the head learns from exactly that: batched
greedy continuations of training-split prompts (backbone frozen), with the backbone's
full next-token distribution as a soft target at every chain level (draft j at base
position t is taught the backbone's distribution at t + j). Chaining and attention are
as the engine drafts (scripts/demo_chain.py: `_mtp_level`, `_level_mask`).

  python scripts/demo_distill.py --model mtpdist/demo_model --data .demo_data --out OUT \
         --gen-seconds 150 --seconds 420 --chain 1 0.7 0.5

Writes OUT/mtp-alpha{A}.safetensors (the head alone, float32: A x original + (1 - A) x
distilled) and OUT/distill_stats.json; `merge` puts one head into a bundled model dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo_chain import tree_map_float32  # noqa: E402


def greedy_continuations(head, stack, prompts: np.ndarray, gen: int) -> np.ndarray:
    """Prompts [B, P] -> [B, P + gen]: the backbone's greedy continuation, batched on caches."""
    import mlx.core as mx
    caches = stack.make_caches()
    h = head.norm(stack(head.embed(mx.array(prompts)), caches))
    tok, out = mx.argmax(head.logits(h[:, -1]), axis=-1), []
    for _ in range(gen):
        out.append(tok)
        h = head.norm(stack(head.embed(tok[:, None]), caches))
        tok = mx.argmax(head.logits(h[:, -1]), axis=-1)
        mx.eval(tok)  # one step at a time: a lazy graph of every step is too large for a CUDA graph
    return np.concatenate([prompts, np.array(mx.stack(out, axis=1))], axis=1)


def make_data(head, stack, tokens: np.ndarray, seconds: float, batch: int, prompt: int, gen: int,
              seed: int) -> np.ndarray:
    """Greedy continuations of random prompts from `tokens` until `seconds` have passed."""
    rng, rows, t0 = np.random.default_rng(seed), [], time.time()
    while time.time() - t0 < seconds or not rows:
        starts = rng.integers(0, len(tokens) - prompt, batch)
        rows.append(greedy_continuations(head, stack, np.stack([tokens[s : s + prompt] for s in starts]), gen))
        print(f"generated {sum(len(r) for r in rows)} sequences, {time.time() - t0:.0f}s", flush=True)
    return np.concatenate(rows).astype(np.int32)


def distill_losses(head, stack, mtp, x, depth: int):
    """Soft cross-entropy of each chain level against the backbone, and its argmax agreement.

    x [B, T + depth]: level j's output at base t is compared with the backbone's
    distribution at t + j (which predicts token t + j + 1).
    """
    import mlx.core as mx
    from demo_chain import _level_mask, _mtp_level, extend_keys, level_contexts
    T = x.shape[1] - depth
    h = mx.stop_gradient(head.norm(stack(head.embed(x), [None] * len(stack.layers))))
    teacher = mx.stop_gradient(head.logits(h))
    hidden, earlier, losses, agree, ok = h[:, :T], None, [], [], None
    for j in range(1, depth + 1):
        ctxs = level_contexts(mtp, j, earlier)
        z = _mtp_level(mtp, hidden, head.embed(x[:, j : T + j]), ctxs, _level_mask(T, j))
        student = head.logits(z)
        target = teacher[:, j : T + j]
        p = mx.softmax(target.astype(mx.float32), axis=-1)
        losses.append(-(p * (student - mx.logsumexp(student, axis=-1, keepdims=True))).sum(-1).mean())
        hit = mx.argmax(student, axis=-1) == mx.argmax(target, axis=-1)
        ok = hit if ok is None else ok & hit
        agree.append(ok.astype(mx.float32).mean())
        earlier = extend_keys(earlier, ctxs)
        hidden = z
    return losses, agree


def grow(mtp, config, layers: int) -> None:
    """Append attention layers to the MTP head that start as the identity (zero output projections).

    The head then computes exactly what it did, and training can only add what the new layers learn.
    """
    import mlx.core as mx
    from mtpdist.model.layers import DecoderLayer
    while len(mtp.layers) < layers:
        layer = DecoderLayer(config.text_args(), linear=False)
        layer.update(tree_map_float32(layer.parameters()))
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
        mtp.layers.append(layer)


def distill(a) -> dict:
    """Generate, then train the MTP head alone on the generated sequences; write heads and stats."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mtpdist.model.loader import load_parts

    parts = load_parts(a.model, mtp=True)
    head, stack, mtp = parts.head, parts.stack, parts.mtp
    for m in (head, stack, mtp):
        m.update(tree_map_float32(m.parameters()))
    head.freeze()
    stack.freeze()
    grow(mtp, parts.config, a.mtp_layers)
    original = {k: mx.array(v) for k, v in tree_flatten(mtp.parameters())}
    print(f"device {mx.default_device()}, MTP layers {len(mtp.layers)}", flush=True)
    if a.gen_file and a.gen_file.exists():
        train = np.load(a.gen_file)
    else:
        train = make_data(head, stack, np.load(a.data / "train.npy").astype(np.int32), a.gen_seconds,
                          a.gen_batch, a.prompt, a.gen, seed=0)
        if a.gen_file:
            np.save(a.gen_file, train)
    if a.seconds <= 0:
        return {}
    held = make_data(head, stack, np.load(a.data / "heldout.npy").astype(np.int32), 0, 64, a.prompt, a.gen, seed=1)
    depth, rng = len(a.chain), np.random.default_rng(2)

    def evaluate():
        ls, ag = distill_losses(head, stack, mtp, mx.array(held), depth)
        return [round(v.item(), 4) for v in ls], [round(v.item(), 4) for v in ag]

    before = evaluate()
    print("held-out before", before, flush=True)
    opt = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(1e-6, a.lr, 50), optim.cosine_decay(a.lr, a.decay_steps, a.lr * 0.1)], [50]),
        weight_decay=0.01)

    def loss_fn(mtp, x):
        ls, ag = distill_losses(head, stack, mtp, x, depth)
        return sum(w * v for w, v in zip(a.chain, ls)), ag

    grad = nn.value_and_grad(mtp, loss_fn)
    text, width = np.load(a.data / "train.npy").astype(np.int32), train.shape[1]
    n_text = int(round(a.batch * a.text_fraction))
    t0, step = time.time(), 0
    while time.time() - t0 < a.seconds:
        # generated rows teach the decode-time context; text rows (soft targets too) add unlimited variety
        rows = [train[rng.integers(0, len(train), a.batch - n_text)]]
        rows += [np.stack([text[s : s + width] for s in rng.integers(0, len(text) - width, n_text)])] if n_text else []
        x = mx.array(np.concatenate(rows))
        (loss, ag), g = grad(mtp, x)
        opt.update(mtp, optim.clip_grad_norm(g, 1.0)[0])
        mx.eval(mtp.parameters(), opt.state, loss)
        step += 1
        if step % 100 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f} agree",
                  " ".join(f"{v.item():.3f}" for v in ag), "held", evaluate()[1], flush=True)
    after = evaluate()
    a.out.mkdir(parents=True, exist_ok=True)
    tuned = dict(tree_flatten(mtp.parameters()))
    heads = {}
    for alpha in a.alphas:
        w = {k: alpha * original[k] + (1 - alpha) * tuned[k] for k in tuned}
        mtp.update(tree_unflatten(list(w.items())))
        heads[str(alpha)] = evaluate()
        mx.save_safetensors(str(a.out / f"mtp-alpha{alpha}.safetensors"), {"mtp." + k: v for k, v in w.items()})
    stats = {"what": "MTP head self-distilled on the backbone's greedy continuations (backbone frozen)",
             "sequences": int(len(train)), "prompt": a.prompt, "generated": a.gen, "steps": step,
             "seconds": round(time.time() - t0), "gen_seconds": a.gen_seconds, "batch": a.batch, "lr": a.lr,
             "chain_weights": list(a.chain), "text_fraction": a.text_fraction, "device": str(mx.default_device()),
             "heldout_before": {"soft_ce": before[0], "chained_agreement": before[1]},
             "heldout_after_by_alpha": {k: {"soft_ce": v[0], "chained_agreement": v[1]} for k, v in heads.items()},
             "heldout_after": {"soft_ce": after[0], "chained_agreement": after[1]}}
    (a.out / "distill_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats), flush=True)
    return stats


def merge(model_dir: Path, head_file: Path) -> None:
    """Put a head into a converted model directory: its `mtp.*` tensors replace the old ones.

    A head with more layers than the model's (`distill --mtp-layers`) also sets
    `mtp_num_hidden_layers` in config.json and the index's weight map.
    """
    import mlx.core as mx
    new = mx.load(str(head_file))
    index_file = model_dir / "model.safetensors.index.json"
    # A model of one weights file has no index: then that file holds the head.
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    f = model_dir / (index["weight_map"]["mtp.fc.weight"] if index else "model.safetensors")
    if not f.exists():
        raise SystemExit(f"{model_dir}: neither model.safetensors.index.json nor model.safetensors")
    weights, meta = mx.load(str(f), return_metadata=True)
    if "mtp.fc.weight" not in weights:
        raise SystemExit(f"{f}: no MTP head (mtp.fc.weight) to replace")
    dtype = weights["mtp.fc.weight"].dtype
    size = index["metadata"]["total_size"] if index else 0
    for k in [k for k in weights if k.startswith("mtp.")]:
        size -= weights.pop(k).nbytes
        if index:
            index["weight_map"].pop(k, None)
    for k, v in new.items():
        weights[k] = v.astype(dtype)
        size += weights[k].nbytes
        if index:
            index["weight_map"][k] = f.name
    mx.save_safetensors(str(f), weights, metadata=meta)
    if index:
        index["metadata"]["total_size"] = size
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    layers = len({k.split(".")[2] for k in new if k.startswith("mtp.layers.")})
    cfg_file = model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    (cfg["text_config"] if "text_config" in cfg else cfg)["mtp_num_hidden_layers"] = layers
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{f}: MTP head of {layers} layer(s), {len(new)} tensors")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--data", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--gen-seconds", type=float, default=150)
    d.add_argument("--gen-batch", type=int, default=128)
    d.add_argument("--text-fraction", type=float, default=0.25,
                   help="share of each training batch drawn from the corpus itself (soft targets too)")
    d.add_argument("--prompt", type=int, default=32)
    d.add_argument("--gen", type=int, default=160)
    d.add_argument("--seconds", type=float, default=420)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--decay-steps", type=int, default=4000)
    d.add_argument("--chain", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    d.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    d.add_argument("--mtp-layers", type=int, default=1,
                   help="grow the head to this many attention layers (new ones start as the identity)")
    d.add_argument("--gen-file", type=Path,
                   help="generated continuations: loaded if it exists, else generated and saved there "
                        "(--seconds 0: generate only)")
    m = sub.add_parser("merge")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--head", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "distill":
        distill(a)
    else:
        merge(a.model, a.head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
