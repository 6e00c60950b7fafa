"""Sampling and speculative acceptance on one filtered distribution.

The target and the draft token are both drawn from `filtered_probs` with the same
settings, so the acceptance ratio p/q compares like with like. Host-side draws use a
seeded numpy Generator so a run is reproducible across single-process and pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probs(logits: mx.array, p: SamplingParams) -> mx.array:
    """fp32 probabilities over the last axis after temperature, top-k, top-p and min-p."""
    x = logits.astype(mx.float32) / p.temperature
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    vocab = x.shape[-1]
    if 0 < p.top_k < vocab:
        kth = mx.sort(x, axis=-1)[..., vocab - p.top_k][..., None]
        x = mx.where(x >= kth, x, -mx.inf)
    if p.top_p < 1.0:
        order = mx.argsort(-x, axis=-1)
        sorted_p = mx.take_along_axis(mx.exp(x), order, axis=-1)
        before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < p.top_p * mx.sum(sorted_p, axis=-1, keepdims=True)
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        x = mx.where(keep, x, -mx.inf)
    if p.min_p > 0:
        x = mx.where(x >= mx.max(x, axis=-1, keepdims=True) + np.log(p.min_p), x, -mx.inf)
    return mx.softmax(x, axis=-1)


class Sampler:
    """Draws tokens and makes speculative accept/reject decisions for one sequence."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probs(self, logits: mx.array) -> np.ndarray:
        return np.asarray(filtered_probs(logits, self.params), dtype=np.float64)

    def draw(self, probs: np.ndarray) -> int:
        """One token from a (not necessarily normalized) probability vector."""
        c = np.cumsum(probs)
        return int(min(np.searchsorted(c, self.rng.random() * c[-1], side="right"), len(c) - 1))

    def sample(self, logits: mx.array) -> int:
        """A token from logits [V]: argmax when greedy, else a filtered draw."""
        if self.params.greedy:
            return int(mx.argmax(logits, axis=-1).item())
        return self.draw(self.probs(logits))

    def verify(self, target: np.ndarray, draft: int, q: np.ndarray) -> tuple[bool, int]:
        """Accept `draft` with probability min(1, p/q); on rejection draw from max(p-q, 0).

        Returns (accepted, token): token is the draft when accepted, else the correction.
        """
        pd, qd = target[draft], q[draft]
        if qd > 0 and self.rng.random() * qd < pd:
            return True, draft
        residual = np.maximum(target - q, 0.0)
        return False, self.draw(residual if residual.sum() > 0 else target)
