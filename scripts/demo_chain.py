"""Chained MTP for the demo model: a training objective and a held-out measure, by depth.

Chaining (as the engine drafts): draft 1 = MTP(hidden = backbone's post-final-norm h_p,
token x_{p+1}); draft j+1 = MTP(hidden = the head's own normed output z_j, token d_j).
Draft j's MTP entry sits at position p + j - 1 and attends to the depth-1 entries of
positions <= p (the confirmed pairs in the MTP cache) and to the chain's own entries.

Training reproduces exactly that attention with teacher forcing: level j's keys are the
level-1 keys (causal) plus, for each level m <= j, the key of the same base position.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class _LevelKeys:
    """Stands in for the MTP layer's KV cache at chain level j during training.

    Gives the attention its RoPE offset (level j sits j-1 positions after its base) and
    returns this level's keys appended to the earlier levels'; `mask` says which count.
    """

    def __init__(self, offset: int, earlier: tuple[mx.array, mx.array] | None):
        self.offset, self.earlier, self.mine = offset, earlier, None

    def update_and_fetch(self, keys, values):
        self.mine = (keys, values)
        if self.earlier is None:
            return keys, values
        return (mx.concatenate([self.earlier[0], keys], axis=2), mx.concatenate([self.earlier[1], values], axis=2))


def _level_mask(T: int, level: int) -> mx.array:
    """[T, level*T]: causal over level-1 keys, then only the same base position at each deeper level."""
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    eye = mx.eye(T, dtype=mx.bool_)
    return mx.concatenate([causal] + [eye] * (level - 1), axis=1)


def _mtp_level(mtp, hidden, embed, ctxs: list, mask):
    """The MTPHead forward (fc over [e, h], its attention layers, norm) with a chain-level context.

    Same arithmetic as MTPHead.__call__ and DecoderLayer.__call__; only the mask and the
    key source (one `_LevelKeys` per layer) differ.
    """
    z = mtp.fc(mx.concatenate([mtp.pre_fc_norm_embedding(embed), mtp.pre_fc_norm_hidden(hidden)], axis=-1))
    for layer, ctx in zip(mtp.layers, ctxs):
        z = z + layer.self_attn(layer.input_layernorm(z), mask, ctx)
        z = z + layer.mlp(layer.post_attention_layernorm(z))
    return mtp.norm(z)


def level_contexts(mtp, level: int, earlier: list | None) -> list:
    """One `_LevelKeys` per MTP layer for chain level `level`, over the earlier levels' keys."""
    return [_LevelKeys(level - 1, None if earlier is None else earlier[i]) for i in range(len(mtp.layers))]


def extend_keys(earlier: list | None, ctxs: list) -> list:
    """Each layer's keys of the levels so far, with this level's appended."""
    if earlier is None:
        return [c.mine for c in ctxs]
    return [tuple(mx.concatenate([e, m], axis=2) for e, m in zip(prev, c.mine)) for prev, c in zip(earlier, ctxs)]


def chain_losses(head, stack, mtp, x, depth: int):
    """Backbone next-token loss and the MTP loss at each chain level on x [B, T + depth + 1]."""
    T = x.shape[1] - depth - 1
    h = head.norm(stack(head.embed(x[:, :T]), [None] * len(stack.layers)))
    l0 = nn.losses.cross_entropy(head.logits(h), x[:, 1 : T + 1], reduction="mean")
    hidden, earlier, out = h, None, []
    for j in range(1, depth + 1):
        ctxs = level_contexts(mtp, j, earlier)
        z = _mtp_level(mtp, hidden, head.embed(x[:, j : T + j]), ctxs, _level_mask(T, j))
        out.append(nn.losses.cross_entropy(head.logits(z), x[:, j + 1 : T + j + 1], reduction="mean"))
        earlier = extend_keys(earlier, ctxs)
        hidden = z
    return l0, out


def acceptance_by_depth(model_dir, data, depth: int = 4, prompts: int = 24, prompt_len: int = 48,
                        gen: int = 48) -> dict:
    """Held-out greedy chained-draft acceptance at depth 1..depth, with the product's model code.

    For each prompt: greedy continuation (plain), then at every generated position p the
    chain drafts d_1..d_depth from the MTP cache of confirmed depth-1 pairs (speculative
    entries trimmed afterwards). Cumulative: drafts 1..j all equal the greedy tokens.
    """
    from mtpdist.coordinator.local_session import LocalSession
    from mtpdist.engine.driver import generate
    from mtpdist.engine.generate import GenerationRequest
    from mtpdist.engine.scheduler import Scheduler
    from mtpdist.worker.in_process import LocalTransport

    held = np.load(data / "heldout.npy").astype(np.int64)
    rng = np.random.default_rng(1)
    s = LocalSession(model_dir, LocalTransport, mtp=True)
    sched = Scheduler(s.generator, s)
    head, mtp = s.parts.head, s.parts.mtp
    hits = np.zeros(depth, dtype=np.int64)
    positions = 0
    for start in rng.integers(0, len(held) - prompt_len - 1, prompts):
        ids = [int(t) for t in held[start : start + prompt_len]]
        seq = ids + list(generate(sched, GenerationRequest(tuple(ids), gen, mtp=False)).token_ids)
        n = head.norm(s.parts.stack.ragged(head.embed(mx.array([seq])), [(s.parts.stack.make_caches(), len(seq), ())]))
        caches = mtp.make_caches()
        # confirmed depth-1 pairs (n_i, seq[i+1]) for the prompt's positions before the first draft
        first = prompt_len - 1
        mx.eval(mtp(n[:, :first], head.embed(mx.array([seq[1 : first + 1]])), caches))
        for p in range(first, len(seq) - depth - 1):
            hidden, tok, ok = n[:, p : p + 1], seq[p + 1], True
            for j in range(depth):
                z = mtp(hidden, head.embed(mx.array([[tok]])), caches)
                d = int(mx.argmax(head.logits(z[0, -1])).item())
                ok = ok and d == seq[p + j + 2]
                hits[j] += ok
                hidden, tok = z, d
            for c in caches:  # keep only the confirmed pair at p
                c.rewind(depth - 1)
            positions += 1
    cumulative = hits / max(positions, 1)
    conditional = [cumulative[0]] + [cumulative[j] / cumulative[j - 1] if cumulative[j - 1] else 0.0
                                     for j in range(1, depth)]
    return {"heldout_prompts": prompts, "positions": positions,
            "acceptance_by_depth_cumulative": [round(float(v), 4) for v in cumulative],
            "acceptance_by_depth_conditional": [round(float(v), 4) for v in conditional],
            "expected_tokens_per_verify": {str(k): round(1 + float(cumulative[:k].sum()), 4)
                                           for k in range(1, depth + 1)}}


def finetune_mtp(model_dir, data, out, seconds: float, chain: tuple[float, ...], batch: int = 64, seq: int = 128,
                 lr: float = 5e-4) -> dict:
    """Train only the MTP head of a finished model with the chained objective (backbone frozen).

    Writes canonical-*.safetensors + config.json + train_stats.json as `train` does, so
    `package` makes the released layout from them; the backbone's weights are unchanged.
    """
    import json
    import time

    import mlx.optimizers as optim

    from mtpdist.model.loader import load_parts
    from mtpdist.model.synthetic import make_config

    parts = load_parts(model_dir, mtp=True)
    head, stack, mtp = parts.head, parts.stack, parts.mtp
    for m in (head, stack, mtp):  # train in float32, as `train` does
        m.update(tree_map_float32(m.parameters()))
    head.freeze()
    stack.freeze()
    tokens = np.load(data / "train.npy").astype(np.int32)
    held = np.load(data / "heldout.npy").astype(np.int32)
    rng = np.random.default_rng(0)
    opt = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(1e-6, lr, 50), optim.cosine_decay(lr, 4000, lr * 0.1)], [50]), weight_decay=0.05)
    depth = len(chain)

    def batch_of(src, n):
        starts = rng.integers(0, len(src) - seq - depth - 2, n)
        return mx.array(np.stack([src[s : s + seq + depth + 1] for s in starts]))

    def loss_fn(mtp, x):
        _, levels = chain_losses(head, stack, mtp, x, depth)
        return sum(w * v for w, v in zip(chain, levels)), levels

    grad = nn.value_and_grad(mtp, loss_fn)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        (loss, levels), g = grad(mtp, batch_of(tokens, batch))
        opt.update(mtp, optim.clip_grad_norm(g, 1.0)[0])
        mx.eval(mtp.parameters(), opt.state, loss)
        step += 1
        if step % 100 == 0:
            print(f"step {step} {time.time() - t0:.0f}s", " ".join(f"{v.item():.3f}" for v in levels), flush=True)
    evals = [chain_losses(head, stack, mtp, batch_of(held, 16), depth) for _ in range(8)]
    out.mkdir(parents=True, exist_ok=True)
    save_canonical(out, head, stack, mtp)
    raw = make_config("demo")
    raw["text_config"]["eos_token_id"] = 1
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    stats = {"finetuned_from": str(model_dir), "what": "MTP head only, chained objective, backbone frozen",
             "steps": step, "seconds": round(time.time() - t0), "batch": batch, "seq": seq, "lr": lr,
             "chain_weights": list(chain), "device": str(mx.default_device()),
             "heldout_loss": round(float(np.mean([e[0].item() for e in evals])), 4),
             "heldout_mtp_loss_by_level": [round(float(np.mean([e[1][j].item() for e in evals])), 4)
                                           for j in range(depth)]}
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats), flush=True)
    return stats


def save_canonical(out, head, stack, mtp) -> None:
    """Write head, layers and MTP head under their checkpoint names, in 4 shards (each under
    16 MiB, so they travel back from a device run)."""
    from mlx.utils import tree_flatten
    weights = {}
    for prefix, m in (("model.", head), ("model.layers.", stack), ("mtp.", mtp)):
        for k, v in tree_flatten(m.parameters()):
            key = k if k.startswith("lm_head") else prefix + (k[len("layers."):] if prefix == "model.layers." else k)
            weights[key] = v
    keys = sorted(weights)
    for i in range(4):
        mx.save_safetensors(str(out / f"canonical-{i}.safetensors"), {k: weights[k] for k in keys[i::4]})


def tree_map_float32(tree):
    """Every floating parameter as float32 (A_log already is)."""
    from mlx.utils import tree_map
    return tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v, tree)


def blend_mtp(trained, base_model, alpha: float, out) -> dict:
    """Canonical weights of `trained` with the MTP head averaged with `base_model`'s: alpha*base + (1-alpha)*trained.

    Both heads start from the same weights (finetune-mtp), so their average is a head too;
    on the demo model it keeps depth-1 acceptance while the chain gains (BENCHMARKS.md).
    """
    import json
    import shutil

    from mlx.utils import tree_flatten

    from mtpdist.model.loader import load_parts

    base = load_parts(base_model, mtp=True, head=False, layers=(0, 0)).mtp
    base_w = {"mtp." + k: v.astype(mx.float32) for k, v in tree_flatten(base.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(trained.glob("canonical-*.safetensors")):
        w = {k: alpha * base_w[k] + (1 - alpha) * v if k.startswith("mtp.") else v for k, v in mx.load(str(f)).items()}
        mx.save_safetensors(str(out / f.name), w)
    shutil.copy(trained / "config.json", out / "config.json")
    stats = json.loads((base_model / "train_stats.json").read_text())
    stats["mtp_chain_finetune"] = {**json.loads((trained / "train_stats.json").read_text()),
                                   "blend": f"MTP head = {alpha} x base + {1 - alpha:g} x fine-tuned"}
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
