"""qwen4_exp's MTP head: greedy decoding with it is token-identical to plain greedy decoding,
in one process and through the scheduler with 1-3 real workers (the 4-stream rows and their
token-id columns crossing the wire), at depths 1-3."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mtpdist.engine.driver import generate, run_all
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.model.loader import load_parts

from conftest import QWEN4_GOLDENS
from helpers import OracleDrafter, local_session, plain_greedy, spec_greedy
from test_scheduler_pipeline import live_sequences, session_over
from workers import workers

PROMPTS = [[5, 17, 99, 3, 42, 8, 100, 11, 7, 30, 12, 13, 14], [7], [1, 50, 51, 1, 1, 52, 53, 54, 55, 56, 57, 58]]


@pytest.fixture(scope="module")
def parts(tiny_qwen4):
    return load_parts(tiny_qwen4, mtp=True)


def test_mtp_head_loads_in_the_release_layout(parts):
    mtp = parts.mtp
    assert not hasattr(mtp, "fc") and not hasattr(mtp, "norm")      # fc_embedding / fc_hidden instead
    assert mtp.layers[0].self_attn.indexer is not None and not mtp.layers[0].has_ple


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_mtp_identical_to_plain(parts, depth):
    want = plain_greedy(parts, PROMPTS[0], 30, step=4)
    got, stats = spec_greedy(parts, PROMPTS[0], 30, step=4, depth=depth)
    assert got == want and stats.drafted > 0
    got, stats = spec_greedy(parts, PROMPTS[0], 24, step=4, depth=depth, drafter=OracleDrafter(
        PROMPTS[0] + want + [0] * 4, parts.config.vocab_size, wrong=lambda i: i % 5 in (0, 3)))
    assert got == want[:24] and 0 < stats.accepted < stats.drafted   # accepts and rejects both happen


def test_pre_mixer_setting_is_also_lossless(parts):
    assert spec_greedy(parts, PROMPTS[2], 20, post_norm=False)[0] == plain_greedy(parts, PROMPTS[2], 20)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_greedy_mtp_through_workers_identical_to_plain(tmp_path, tiny_qwen4, n_workers):
    local = local_session(tiny_qwen4, prefill_step=8)
    reqs = [GenerationRequest(tuple(p), 20, mtp=True, mtp_depth=1 + i) for i, p in enumerate(PROMPTS)]
    want = [generate(Scheduler(local.generator, local, SchedulerSettings(reuse_prefixes=False)),
                     replace(r, mtp=False)).token_ids for r in reqs]
    with workers(n_workers, tmp_path) as ws:
        session = session_over(tiny_qwen4, [w.address for w in ws])
        sched = Scheduler(session.generator, session, SchedulerSettings(prefill_budget=8))
        sinks = run_all(sched, reqs, timeout=180)
        assert [s.wait().token_ids for s in sinks] == want
        assert live_sequences(session.addresses) == [0] * n_workers
        session.close()


def test_mtp_head_matches_mlx_vlm_drafter(parts):
    """Logits of every prompt entry and of one chained draft equal mlx-vlm's qwen4_exp_mtp
    drafter on the same weights and inputs (golden files from scripts/gen_qwen4exp_mtp_goldens.py)."""
    g = mx.load(str(QWEN4_GOLDENS / "mtp_logits.safetensors"))
    caches = parts.mtp.make_caches()
    z = parts.mtp(g["hidden"][None], parts.head.embed(g["tokens"][None]), caches)
    np.testing.assert_allclose(np.asarray(parts.head.logits(z)[0]), np.asarray(g["logits"]), atol=2e-5)
    z2 = parts.mtp(z[:, -1:], parts.head.embed(g["chain_token"][None]), caches)   # fed its own output
    np.testing.assert_allclose(np.asarray(parts.head.logits(z2)[0]), np.asarray(g["chain_logits"]), atol=2e-5)
