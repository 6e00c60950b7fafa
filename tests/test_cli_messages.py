"""One-line errors where a user would otherwise get a traceback or a confusing line; convert
never overwrites silently; the test suite leaves tracked files alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "mtpdist" / "demo_model"


def mtpdist(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mtpdist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(p, *words):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert all(w in p.stderr for w in words), p.stderr


def test_missing_path_file_path_and_truncated_weights(tmp_path):
    one_line_error(mtpdist("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "no such file or folder")
    (tmp_path / "f").write_text("x")
    one_line_error(mtpdist("generate", "--model", str(tmp_path / "f"), "--prompt", "x"), "is a file")
    model = tmp_path / "truncated"
    shutil.copytree(DEMO, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])   # an interrupted download
    one_line_error(mtpdist("generate", "--model", str(model), "--prompt", "x"), "incomplete download",
                   "model.safetensors")


def test_no_workers_found_says_so_plainly():
    p = mtpdist("coordinator", "--model", str(DEMO), "--insecure", "--discover-timeout", "1",
                "--mdns-interface", "127.0.0.1", "--cluster", "nobody-here")
    one_line_error(p, "found no workers in cluster 'nobody-here'")
    assert "0 of 0" not in p.stderr
    p = mtpdist("status", "--insecure", "--discover-timeout", "1", "--mdns-interface", "127.0.0.1",
                "--cluster", "nobody-here")
    assert p.returncode == 1 and "no workers found within 1s (cluster 'nobody-here', mDNS on 127.0.0.1)" in p.stdout


def test_convert_refuses_to_overwrite_without_force(tiny_dense, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(mtpdist("convert", "--hf-path", str(tiny_dense[0]), "--mlx-path", str(out)), "already exists",
                   "--force")
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()
    one_line_error(mtpdist("convert", "--hf-path", str(tiny_dense[0]), "--mlx-path", str(tiny_dense[0])),
                   "being converted")
    p = mtpdist("convert", "--hf-path", str(tiny_dense[0]), "--mlx-path", str(out), "--force")
    assert p.returncode == 0, p.stderr
    assert (out / "config.json").is_file()


def test_tool_state_folders_are_not_tracked():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", ".schemathesis"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".schemathesis/default/cache/crashes/manifest.json"],
                             cwd=ROOT)
    assert ignored.returncode == 0
