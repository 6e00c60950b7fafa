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


def _mtp_level(mtp, hidden, embed, ctx: _LevelKeys, mask):
    """The MTPHead forward (fc over [e, h], its one attention layer, norm) with a chain-level context.

    Same arithmetic as MTPHead.__call__ and DecoderLayer.__call__; only the mask and the
    key source differ (DecoderLayer builds its own mask from a real cache).
    """
    z = mtp.fc(mx.concatenate([mtp.pre_fc_norm_embedding(embed), mtp.pre_fc_norm_hidden(hidden)], axis=-1))
    (layer,) = mtp.layers
    r = layer.self_attn(layer.input_layernorm(z), mask, ctx)
    z = z + r
    z = z + layer.mlp(layer.post_attention_layernorm(z))
    return mtp.norm(z)


def chain_losses(head, stack, mtp, x, depth: int):
    """Backbone next-token loss and the MTP loss at each chain level on x [B, T + depth + 1]."""
    T = x.shape[1] - depth - 1
    h = head.norm(stack(head.embed(x[:, :T]), [None] * len(stack.layers)))
    l0 = nn.losses.cross_entropy(head.logits(h), x[:, 1 : T + 1], reduction="mean")
    hidden, earlier, out = h, None, []
    for j in range(1, depth + 1):
        ctx = _LevelKeys(j - 1, earlier)
        z = _mtp_level(mtp, hidden, head.embed(x[:, j : T + j]), ctx, _level_mask(T, j))
        out.append(nn.losses.cross_entropy(head.logits(z), x[:, j + 1 : T + j + 1], reduction="mean"))
        mine = ctx.mine
        earlier = mine if earlier is None else tuple(mx.concatenate([e, m], axis=2) for e, m in zip(earlier, mine))
        hidden = z
    return l0, out


def acceptance_by_depth(model_dir, data, depth: int = 4, prompts: int = 24, prompt_len: int = 48,
                        gen: int = 48) -> dict:
    """Held-out greedy chained-draft acceptance at depth 1..depth, with the product's model code.

    For each prompt: greedy continuation (plain), then at every generated position p the
    chain drafts d_1..d_depth from the MTP cache of confirmed depth-1 pairs (speculative
    entries trimmed afterwards). Cumulative: drafts 1..j all equal the greedy tokens.
    """
    from mtpdist.engine.generate import GenerationRequest
    from mtpdist.engine.local import LocalSession
    from mtpdist.engine.trunk import LocalTrunk

    held = np.load(data / "heldout.npy").astype(np.int64)
    rng = np.random.default_rng(1)
    s = LocalSession(model_dir, mtp=True)
    head, mtp = s.parts.head, s.parts.mtp
    hits = np.zeros(depth, dtype=np.int64)
    positions = 0
    for start in rng.integers(0, len(held) - prompt_len - 1, prompts):
        ids = [int(t) for t in held[start : start + prompt_len]]
        seq = ids + list(s.generator.generate(GenerationRequest(tuple(ids), gen, mtp=False), s.trunk()).token_ids)
        n = head.norm(LocalTrunk(s.parts.stack).forward(head.embed(mx.array([seq]))))
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
