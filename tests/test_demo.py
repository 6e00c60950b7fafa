"""`mtpdist demo --once --json`: the bundled model through two discovered local workers, with MTP."""

from __future__ import annotations

import json
import subprocess
import sys

from mtpdist.coordinator.demo import DEMO_MODEL
from mtpdist.model.loader import load_parts


def test_bundled_model_has_a_real_mtp_head():
    parts = load_parts(DEMO_MODEL, mtp=True)
    c = parts.config
    assert c.mtp_num_hidden_layers == 1 and {c.is_linear(i) for i in range(c.num_hidden_layers)} == {True, False}


def test_demo_once_matches_single_process_generate():
    demo = subprocess.run([sys.executable, "-m", "mtpdist.cli", "demo", "--once", "--json", "--max-tokens", "40"],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    got = json.loads(demo.stdout)
    plain = json.loads(subprocess.run(
        [sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(DEMO_MODEL), "--prompt",
         "def fibonacci(n):\n    ", "--max-tokens", "40", "--json"], capture_output=True, text=True, check=True).stdout)
    assert got["token_ids"] == plain["token_ids"] and got["text"] == plain["text"]
    assert got["drafted"] > 0 and got["acceptance"] > 0.3   # a trained head, not a random one
