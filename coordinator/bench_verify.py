"""The verify cost curve: one verify pass over T tokens, in plain steps, for T = 1..max_t.

A depth-k MTP cycle verifies k+1 tokens in one backbone pass, with a GatedDeltaNet
snapshot after each of the first T-1 positions (so any number of drafts can be rejected).
Whether depth k pays depends on verify(T) / step: this module measures it. Each pass is
the real one: embed, every layer, final norm, lm_head over all T rows, argmax, with the
caches evaluated; afterwards the caches are put back, so every pass sees the same context.
The T values are interleaved within each round and medians taken (the machine is noisy).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mtpdist import __version__
from mtpdist.model import layers as model_layers
from mtpdist.model.cache import GDNCache, cache_arrays
from mtpdist.model.config import ModelConfig
from mtpdist.model.loader import ModelParts, load_parts
from mtpdist.model.qwen35 import Head, LayerStack


@contextmanager
def small_t_limit(value: int | None):
    """Experiment knob: passes of at most `value` tokens take the compiled GDN path (None: as shipped)."""
    old = model_layers.SMALL_T
    if value is not None:
        model_layers.SMALL_T = value
    try:
        yield model_layers.SMALL_T
    finally:
        model_layers.SMALL_T = old


def random_parts(size: str, *, num_layers: int | None = None, dtype: str = "bfloat16",
                 q_bits: int | None = None, group_size: int = 64, seed: int = 0) -> ModelParts:
    """Head + all layers of a synthetic size, random weights built in memory (no files).

    Cast and quantized as `mtpdist convert` would (A_log stays float32); layer by layer,
    so a 9B-shaped model never holds a float32 copy of itself.
    """
    from .model.convert import DTYPES, _tree_cast
    from .model.synthetic import make_config

    mx.random.seed(seed)
    config = ModelConfig.from_dict(make_config(size, num_layers=num_layers))
    head, stack = Head(config), LayerStack(config, 0, config.num_hidden_layers)

    def settle(m: nn.Module) -> None:
        m.update(_tree_cast(m.parameters(), DTYPES[dtype]))
        if q_bits:
            nn.quantize(m, group_size=group_size, bits=q_bits,
                        class_predicate=lambda _, x: hasattr(x, "to_quantized") and x.weight.shape[-1] % group_size == 0)
        mx.eval(m.parameters())

    for layer in stack.layers:
        settle(layer)
    settle(head)
    return ModelParts(config=config, path=Path(f"<random {size}>"), head=head, stack=stack)


def _save(caches) -> list:
    return [(c.conv, c.ssm, c.offset, dict(c.snapshots)) if isinstance(c, GDNCache) else c.offset
            for c in caches]


def _restore(caches, saved) -> None:
    for c, s in zip(caches, saved):
        if isinstance(c, GDNCache):
            c.conv, c.ssm, c.offset, c.snapshots = s[0], s[1], s[2], dict(s[3])
        else:
            c.trim(c.offset - s)


def verify_curve(parts: ModelParts, max_t: int = 8, cycles: int = 20, context: int = 64,
                 warmup: int = 2, seed: int = 0) -> dict:
    """Median ms of a T-token verify pass for T = 1..max_t, and each over the 1-token step."""
    head, stack = parts.head, parts.stack
    vocab = parts.config.vocab_size
    mx.random.seed(seed)
    caches = stack.make_caches()
    ctx = mx.random.randint(2, vocab, (1, context))
    mx.eval(stack(head.embed(ctx), caches), *cache_arrays(caches))
    ids = mx.random.randint(2, vocab, (1, max_t))
    mx.eval(ids)
    saved = _save(caches)

    def one(T: int) -> float:
        t = time.perf_counter()
        h = stack(head.embed(ids[:, :T]), caches, tuple(range(1, T)))
        mx.eval(mx.argmax(head.logits(head.norm(h[0])), axis=-1), *cache_arrays(caches))
        ms = (time.perf_counter() - t) * 1e3
        _restore(caches, saved)
        return ms

    times: dict[int, list[float]] = {T: [] for T in range(1, max_t + 1)}
    for r in range(warmup + cycles):
        for T in times:
            ms = one(T)
            if r >= warmup:
                times[T].append(ms)
    med = {T: statistics.median(v) for T, v in times.items()}
    return {
        "step_ms": round(med[1], 4),
        "verify_ms": {str(T): round(v, 4) for T, v in med.items()},
        "verify_over_step": {str(T): round(v / med[1], 4) for T, v in med.items()},
        "context_tokens": context, "cycles": cycles,
    }


def run_verify_curve(args) -> dict:
    """`mtpdist bench --verify-curve`: the curve for --model, as shipped and with --small-t, as JSON."""
    parts = load_parts(args.model, head=True)
    result = {"mtpdist_version": __version__, "mlx_version": mx.__version__, "device": str(mx.default_device()),
              "machine": platform.platform(), "model": str(Path(args.model).resolve()), "curves": {}}
    for small_t in [None, *args.small_t]:
        with small_t_limit(small_t) as value:
            if f"small_t={value}" not in result["curves"]:
                result["curves"][f"small_t={value}"] = verify_curve(parts, args.max_t, args.cycles)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result
