#!/usr/bin/env python3
"""Train the bundled demo model: a small Qwen3.5-architecture model with a real MTP head.

  prepare  (CPU)   train a 4096-token BPE on Python's standard library; tokenize it into
                   train / held-out arrays (held-out = every file whose name hashes to 0 mod 20)
  train    (any)   train backbone and MTP head together: next-token loss + MTP loss on t+2
                   (--chain-depth K: also on t+3.. with the head fed its own output, scripts/demo_chain.py)
  package  (CPU)   write the released layout (as `mtpdist convert` would) and measure quality

The corpus is whatever this Python ships, so the run needs no download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def corpus_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
    return sorted(f for f in lib.rglob("*.py") if not any(part in skip for part in f.relative_to(lib).parts))


def held_out(f: Path) -> bool:
    return int(hashlib.sha1(f.name.encode()).hexdigest(), 16) % 20 == 0


def prepare(out: Path, vocab: int, tokenizer: Path | None = None) -> None:
    """Train a tokenizer (or copy `tokenizer`'s folder's) and write train / held-out token arrays."""
    import shutil

    from mtpdist.model.tokenizer_gen import write_tokenizer
    from tokenizers import Tokenizer
    files = corpus_files()
    texts = {f: f.read_text(encoding="utf-8", errors="ignore") for f in files}
    train = [t for f, t in texts.items() if not held_out(f)]
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        write_tokenizer(out, vocab, corpus=train)
    else:  # the released model's own tokenizer: new heads for the bundled model need its ids
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, out / name)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    for name, keep in (("train", False), ("heldout", True)):
        ids = []
        for f, t in texts.items():
            if held_out(f) == keep:
                ids.extend(tok.encode(t).ids + [eos])
        np.save(out / f"{name}.npy", np.array(ids, dtype=np.uint16))
        print(f"{name}: {sum(held_out(f) == keep for f in files)} files, {len(ids):,} tokens")


def build(config):
    from mtpdist.model.qwen35 import Head, LayerStack, MTPHead
    return Head(config), LayerStack(config, 0, config.num_hidden_layers), MTPHead(config)


def losses(head, stack, mtp, x, mtp_weight: float):
    """Next-token loss of the backbone and t+2 loss of the MTP head on batch x [B, T+2]."""
    import mlx.nn as nn
    inp, nxt, nxt2 = x[:, :-2], x[:, 1:-1], x[:, 2:]
    h = head.norm(stack(head.embed(inp), [None] * len(stack.layers)))
    l1 = nn.losses.cross_entropy(head.logits(h), nxt, reduction="mean")
    z = mtp(h, head.embed(nxt), [None] * len(mtp.layers))
    l2 = nn.losses.cross_entropy(head.logits(z), nxt2, reduction="mean")
    return l1 + mtp_weight * l2, (l1, l2)


def train(data: Path, out: Path, seconds: float, batch: int, seq: int, lr: float, mtp_weight: float,
          chain: tuple[float, ...] = (1.0,)) -> None:
    """`chain`: weight of the MTP loss at each chain level (one level: the original objective)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mtpdist.model.config import ModelConfig
    from mtpdist.model.synthetic import make_config

    raw = make_config("demo")
    raw["text_config"]["eos_token_id"] = 1
    config = ModelConfig.from_dict(raw)
    mx.random.seed(0)
    head, stack, mtp = build(config)
    model = nn.Module()
    model.head, model.stack, model.mtp = head, stack, mtp
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"device {mx.default_device()}, {n_params / 1e6:.2f}M parameters", flush=True)
    tokens = np.load(data / "train.npy").astype(np.int32)
    held = np.load(data / "heldout.npy").astype(np.int32)
    rng = np.random.default_rng(0)
    warmup, total_guess = 200, 6000
    schedule = optim.join_schedules([optim.linear_schedule(1e-5, lr, warmup),
                                     optim.cosine_decay(lr, total_guess, lr * 0.1)], [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.05)

    def loss_fn(model, x):
        if len(chain) == 1:
            return losses(model.head, model.stack, model.mtp, x, mtp_weight)
        from demo_chain import chain_losses
        l0, levels = chain_losses(model.head, model.stack, model.mtp, x, len(chain))
        return l0 + mtp_weight * sum(w * v for w, v in zip(chain, levels)), (l0, levels[0])

    grad = nn.value_and_grad(model, loss_fn)

    def batch_of(src, n):
        starts = rng.integers(0, len(src) - seq - len(chain) - 2, n)
        return mx.array(np.stack([src[s : s + seq + len(chain) + 1] for s in starts]))

    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        (loss, (l1, l2)), g = grad(model, batch_of(tokens, batch))
        g, _ = optim.clip_grad_norm(g, 1.0)
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state, loss)
        step += 1
        if step % 50 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {l1.item():.3f} mtp {l2.item():.3f}", flush=True)
    evals = [losses(head, stack, mtp, batch_of(held, 16)[:, : seq + 2], mtp_weight)[1] for _ in range(8)]
    l1 = float(np.mean([e[0].item() for e in evals]))
    l2 = float(np.mean([e[1].item() for e in evals]))
    out.mkdir(parents=True, exist_ok=True)
    from demo_chain import save_canonical
    save_canonical(out, head, stack, mtp)
    stats = {"steps": step, "seconds": round(time.time() - t0), "batch": batch, "seq": seq, "lr": lr,
             "mtp_weight": mtp_weight, "chain_weights": list(chain), "params": n_params, "train_tokens": int(len(tokens)),
             "heldout_loss": round(l1, 4), "heldout_mtp_loss": round(l2, 4), "device": str(mx.default_device())}
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    print(json.dumps(stats), flush=True)


def package(trained: Path, data: Path, dst: Path) -> None:
    """Raw-HF files from the trained weights, then `convert` them exactly as a user would."""
    import shutil
    import tempfile

    import mlx.core as mx
    from mtpdist.model.convert import ConvertOptions, convert
    from mtpdist.model.synthetic import to_raw_hf, write_checkpoint
    raw = json.loads((trained / "config.json").read_text())
    weights = {}
    for f in sorted(trained.glob("canonical-*.safetensors")):
        weights.update({k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()})
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, raw, to_raw_hf(weights), tokenizer=False)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(data / f, Path(tmp) / f)
        readme = (dst / "README.md").read_text() if (dst / "README.md").is_file() else None
        if dst.exists():
            shutil.rmtree(dst)
        convert(tmp, dst, ConvertOptions(dtype="bfloat16", mtp_precision="bf16"))
    if readme is not None:  # the model card is written by hand: keep it
        (dst / "README.md").write_text(readme)
    shutil.copy(trained / "train_stats.json", dst / "train_stats.json")
    print(f"wrote {dst}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokenizer", type=Path, help="a model folder whose tokenizer to use instead of training one")
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seconds", type=float, default=480)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--mtp-weight", type=float, default=0.5)
    t.add_argument("--chain", type=float, nargs="+", default=[1.0],
                   help="MTP loss weight per chain level (e.g. 1 0.5 0.25: drafts 1-3; default 1: depth 1 only)")
    k = sub.add_parser("package")
    k.add_argument("--trained", type=Path, required=True)
    k.add_argument("--data", type=Path, required=True)
    k.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("finetune-mtp", help="chained objective on the MTP head only (backbone frozen)")
    f.add_argument("--model", type=Path, required=True)
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--seconds", type=float, default=120)
    f.add_argument("--lr", type=float, default=5e-4)
    f.add_argument("--chain", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    bl = sub.add_parser("blend-mtp", help="average a fine-tuned MTP head with the base model's")
    bl.add_argument("--trained", type=Path, required=True)
    bl.add_argument("--base", type=Path, required=True)
    bl.add_argument("--alpha", type=float, default=0.5, help="weight of the base head (default 0.5)")
    bl.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--depth", type=int, default=1, help="> 1: chained acceptance by depth (demo_chain.py)")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out, a.vocab, a.tokenizer)
    elif a.cmd == "train":
        train(a.data, a.out, a.seconds, a.batch, a.seq, a.lr, a.mtp_weight, tuple(a.chain))
    elif a.cmd == "package":
        package(a.trained, a.data, a.out)
    elif a.cmd == "finetune-mtp":
        from demo_chain import finetune_mtp
        finetune_mtp(a.model, a.data, a.out, a.seconds, tuple(a.chain), lr=a.lr)
    elif a.cmd == "blend-mtp":
        from demo_chain import blend_mtp
        blend_mtp(a.trained, a.base, a.alpha, a.out)
    elif a.depth > 1:
        from demo_chain import acceptance_by_depth
        print(json.dumps(acceptance_by_depth(a.model, a.data, a.depth), indent=2))
    else:
        print(json.dumps(measure(a.model, a.data), indent=2))
    return 0



def measure(model_dir: Path, data: Path, prompts: int = 24, prompt_len: int = 48, gen: int = 48) -> dict:
    """Held-out greedy draft acceptance and plain-vs-MTP agreement, through the product's own path."""
    from mtpdist.coordinator.local_session import LocalSession
    from mtpdist.engine.driver import generate
    from mtpdist.engine.generate import GenerationRequest
    from mtpdist.engine.scheduler import Scheduler
    from mtpdist.worker.in_process import LocalTransport
    held = np.load(data / "heldout.npy").astype(np.int64)
    rng = np.random.default_rng(1)
    s = LocalSession(model_dir, LocalTransport, mtp=True)
    sched = Scheduler(s.generator, s)
    drafted = accepted = 0
    identical = True
    for start in rng.integers(0, len(held) - prompt_len - 1, prompts):
        ids = tuple(int(t) for t in held[start : start + prompt_len])
        spec = generate(sched, GenerationRequest(ids, gen, mtp=True))
        plain = generate(sched, GenerationRequest(ids, gen, mtp=False))
        identical &= spec.token_ids == plain.token_ids
        drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
    return {"heldout_prompts": prompts, "prompt_tokens": prompt_len, "generated_tokens": gen,
            "greedy_acceptance": round(accepted / max(drafted, 1), 4), "mtp_identical_to_plain": bool(identical)}


if __name__ == "__main__":
    sys.exit(main())
