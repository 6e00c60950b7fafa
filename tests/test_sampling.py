"""Sampled speculative decoding follows the target distribution exactly."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

from mtpdist.engine.driver import run_all
from mtpdist.engine.generate import GenerationRequest, Generator
from mtpdist.engine.sampling import Sampler, SamplingParams, filtered_probs
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.model.loader import load_parts

from helpers import InProcess, Layers


def sample_through_scheduler(parts, prompt, n, params: dict, depth: int, draws: int, batch: int = 16,
                             backend=None, settings=SchedulerSettings(reuse_prefixes=False), seeded=True,
                             on_result=lambda r: None):
    """`draws` sampled MTP requests (seeds 0..draws-1) of n tokens, `batch` at a time in one
    scheduler (so their rows share units): the tuples drawn, and drafts accepted/made."""
    sched = Scheduler(Generator(parts, None), backend or InProcess(parts), settings)
    out, accepted, drafted = [], 0, 0
    for start in range(0, draws, batch):
        reqs = [GenerationRequest(tuple(prompt), n, SamplingParams(**params, seed=seed if seeded else None),
                                  mtp=True, mtp_depth=depth,
                                  ignore_eos=True) for seed in range(start, min(start + batch, draws))]
        for sink in run_all(sched, reqs, timeout=600):
            r = sink.wait()
            out.append(tuple(r.token_ids[:n]))
            on_result(r)
            accepted, drafted = accepted + r.accepted, drafted + r.drafted
    assert batch == 1 or sched.stats["max_unit_sequences"] > 1     # the requests really were batched
    return out, accepted, drafted


def test_filters_keep_what_they_should():
    logits = mx.log(mx.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = lambda **kw: np.asarray(filtered_probs(logits, SamplingParams(temperature=1.0, **kw)))
    np.testing.assert_allclose(p(), [0.5, 0.2, 0.15, 0.1, 0.05], atol=1e-6)
    assert np.count_nonzero(p(top_k=2)) == 2
    assert np.count_nonzero(p(top_p=0.6)) == 2          # 0.5 alone is short of 0.6
    assert np.count_nonzero(p(min_p=0.25)) == 3         # >= 0.125
    assert np.isclose(p(top_k=3).sum(), 1.0)


def test_accept_rule_reproduces_target():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(8))
    q = rng.dirichlet(np.ones(8))
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = np.zeros(8)
    for _ in range(20000):
        d = s.draw(q)
        counts[s.verify(p, d, q)[1]] += 1
    assert chisquare(counts, p * counts.sum()).pvalue > 1e-3


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=12, top_p=0.9)])
def test_speculative_sampling_matches_target_joint(tiny_vocab32, params):
    parts = load_parts(tiny_vocab32, mtp=True)
    sp = SamplingParams(**params)
    prompt = [3, 1, 4, 1, 5]
    # Exact joint of the first two generated tokens from the plain model.
    V = parts.config.vocab_size

    def dist(ids):
        t = Layers(parts.stack)
        h = t.forward(parts.head.embed(mx.array([ids])))
        return np.asarray(filtered_probs(parts.head.logits(parts.head.norm(h[0, -1])), sp), dtype=np.float64)

    p1 = dist(prompt)
    joint = np.array([p1[a] * dist(prompt + [a]) for a in range(V)]).ravel()
    counts = np.zeros(V * V)
    draws = 1200
    drawn, accepted, drafted = sample_through_scheduler(parts, prompt, 2, params, 1, draws)
    for out in drawn:
        counts[out[0] * V + out[1]] += 1
    assert 0 < accepted < drafted  # both paths were exercised
    # Pool cells with small expectations so the chi-square approximation holds.
    expected = joint * draws
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def target_joint(parts, prompt, n, sp: SamplingParams) -> dict[tuple, float]:
    """The target's exact probability of every n-token continuation of `prompt` under `sp`."""
    def dist(ids):
        t = Layers(parts.stack)
        h = t.forward(parts.head.embed(mx.array([ids])))
        return np.asarray(filtered_probs(parts.head.logits(parts.head.norm(h[0, -1])), sp), dtype=np.float64)

    joint: dict[tuple, float] = {}

    def expand(prefix, prob):
        if len(prefix) == n:
            joint[prefix] = prob
            return
        p = dist(prompt + list(prefix))
        for tok in np.nonzero(p)[0]:
            expand(prefix + (int(tok),), prob * p[tok])
    expand((), 1.0)
    return joint


def joint_pvalue(joint: dict[tuple, float], drawn: list[tuple]) -> float:
    """Chi-square p-value of the tuples drawn against `joint` (cells under 5 expected pooled);
    a tuple the target gives probability 0 fails at once."""
    counts: dict[tuple, int] = {}
    for key in drawn:
        assert key in joint, f"drew {key}, which the target gives probability 0"
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(joint)
    expected = np.array([joint[k] * len(drawn) for k in keys])
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    big = expected >= 5
    obs, exp = observed[big], expected[big]
    if (~big).any():  # pool the small cells so the chi-square approximation holds
        obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("depth", [1, 3])
def test_depth_k_sampling_matches_target_joint(tiny_vocab32, depth):
    """The first depth+1 tokens (the bootstrap token, then one whole chain) follow the target
    joint. top_k=3 keeps the support small enough to compute that joint exactly."""
    parts = load_parts(tiny_vocab32, mtp=True)
    prompt, n = [3, 1, 4, 1, 5], depth + 1
    joint = target_joint(parts, prompt, n, SamplingParams(temperature=1.0, top_k=3))
    drawn, accepted, drafted = sample_through_scheduler(parts, prompt, n, dict(temperature=1.0, top_k=3), depth, 900)
    assert 0 < accepted < drafted
    assert joint_pvalue(joint, drawn) > 1e-3
