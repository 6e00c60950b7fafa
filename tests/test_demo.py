"""`mtpdist demo --once --json`: the bundled model through two discovered local workers, with MTP."""

from __future__ import annotations

import json
import os
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


def test_demo_serves_and_stops_cleanly_on_ctrl_c():
    import re
    import signal
    import time

    import openai
    p = subprocess.Popen([sys.executable, "-m", "mtpdist.cli", "demo", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, lines = None, []
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            m = re.search(r"serving (http://\S+/v1)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        usage = "".join(p.stdout.readline() for _ in range(8))
        assert "curl " + url in usage and "from openai import OpenAI" in usage
        r = openai.OpenAI(base_url=url, api_key="none", max_retries=0).completions.create(
            model="demo_model", prompt="import os\n", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.model_extra["mtp"]["drafted"] > 0
        group = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
        cmdlines = [open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode() for pid in group]
        assert len([c for c in cmdlines if " worker " in c]) == 2
        assert not any("--token" in c for c in cmdlines), cmdlines   # the secret is not on any command line
        os.killpg(p.pid, signal.SIGINT)               # Ctrl-C goes to the whole foreground group
        assert p.wait(30) in (0, 130)                  # 130: the conventional status after Ctrl-C
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert left == []                              # the workers are gone too
    finally:
        if p.poll() is None:
            p.kill()


def test_demo_with_its_port_taken_fails_at_once_suggesting_port():
    import socket
    import time
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "mtpdist.cli", "demo", "--port", str(port)], capture_output=True,
                           text=True, timeout=120)
        took = time.monotonic() - t0
    assert p.returncode == 2 and f"127.0.0.1:{port}" in p.stderr and "--port" in p.stderr, p.stderr
    assert "started" not in p.stdout and "Traceback" not in p.stderr   # no worker was started
    assert took < 30, took   # before: workers started and layers streamed first
