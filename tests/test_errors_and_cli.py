"""Clear errors for bad checkpoints, and the `mtpdist` CLI end to end (real subprocesses)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from mtpdist.errors import ModelLoadError, UnsupportedModelError
from mtpdist.model.config import ModelConfig
from mtpdist.model.loader import load_parts
from mtpdist.model.synthetic import make_config, random_weights, to_raw_hf, write_checkpoint

from helpers import plain_greedy


def mtpdist(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "mtpdist.cli", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_config_promises_mtp_but_weights_have_none(tmp_path):
    raw = make_config("tiny", num_layers=4)
    w = {k: v for k, v in random_weights(ModelConfig.from_dict(raw)).items() if not k.startswith("mtp.")}
    path = write_checkpoint(tmp_path, raw, to_raw_hf(w), tokenizer=False)
    load_parts(path)  # fine without MTP
    with pytest.raises(ModelLoadError, match="no mtp.. tensors.*mtpdist convert --hf-path"):
        load_parts(path, mtp=True)


def test_model_without_mtp_in_config(tmp_path):
    raw = make_config("tiny", num_layers=4, mtp=False)
    path = write_checkpoint(tmp_path, raw, to_raw_hf(random_weights(ModelConfig.from_dict(raw))), tokenizer=False)
    with pytest.raises(ModelLoadError, match="has no MTP head"):
        load_parts(path, mtp=True)


def test_unknown_architecture(tmp_path):
    raw = make_config("tiny", num_layers=4)
    raw["model_type"] = raw["text_config"]["model_type"] = "llama"
    raw["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'llama'.*LlamaForCausalLM"):
        load_parts(tmp_path)


def test_shapes_that_do_not_match_config(tmp_path, tiny_dense):
    shutil.copytree(tiny_dense[0], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"does not match config.json.*mlp.*weights \(128, 64\), config expects \(96, 64\)"):
        load_parts(tmp_path / "m")


def test_cli_generate_json_matches_library(tiny_dense):
    path = str(tiny_dense[0])
    plain = json.loads(mtpdist("generate", "--model", path, "--prompt", "def f(x):", "--max-tokens", "12", "--json").stdout)
    spec = json.loads(mtpdist("generate", "--model", path, "--prompt", "def f(x):", "--max-tokens", "12",
                              "--json", "--mtp").stdout)
    for key in ("text", "token_ids", "prompt_tokens", "generation_tokens", "generation_tps",
                "drafted", "accepted", "acceptance"):
        assert key in spec
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["generation_tokens"] == 12 and spec["drafted"] > 0 and plain["drafted"] == 0
    parts = load_parts(path)
    from mlx_lm.utils import load_tokenizer
    ids = load_tokenizer(tiny_dense[0]).encode("def f(x):")
    assert plain["token_ids"] == plain_greedy(parts, ids, 12)


def test_cli_plain_text_and_stop_string(tiny_dense):
    path = str(tiny_dense[0])
    full = json.loads(mtpdist("generate", "--model", path, "--prompt", "import os", "--max-tokens", "16", "--json").stdout)
    text = mtpdist("generate", "--model", path, "--prompt", "import os", "--max-tokens", "16").stdout
    assert text.rstrip("\n") == full["text"]
    stop = full["text"][5:8]
    cut = json.loads(mtpdist("generate", "--model", path, "--prompt", "import os", "--max-tokens", "16",
                             "--json", "--stop", stop).stdout)
    assert cut["text"] == full["text"][: full["text"].find(stop)] and cut["finish_reason"] == "stop"


def test_cli_errors_are_messages_not_tracebacks(tmp_path, tiny_dense):
    p = mtpdist("generate", "--model", str(tmp_path), "--prompt", "x", check=False)
    assert p.returncode == 2 and "no config.json" in p.stderr and "Traceback" not in p.stderr
    p = mtpdist("generate", "--model", str(tiny_dense[0]), "--prompt", "x", "--top-p", "0", check=False)
    assert p.returncode == 2 and "top_p" in p.stderr


def test_cli_convert_keeps_mtp(tiny_dense, tmp_path):
    out = tmp_path / "conv"
    mtpdist("convert", "--hf-path", str(tiny_dense[0]), "--mlx-path", str(out), "--dtype", "float32")
    parts = load_parts(out, mtp=True)
    assert parts.mtp is not None and parts.mtp.fc.weight.dtype == mx.bfloat16
    a = json.loads(mtpdist("generate", "--model", str(out), "--prompt", "abc", "--max-tokens", "8", "--json").stdout)
    b = json.loads(mtpdist("generate", "--model", str(tiny_dense[0]), "--prompt", "abc", "--max-tokens", "8", "--json").stdout)
    assert a["token_ids"] == b["token_ids"]


def test_doctor_checks_this_machine():
    p = mtpdist("doctor", "--mdns-interface", "127.0.0.1", "--port", "0", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert set(checks) == {"versions", "mlx backend", "memory", "interfaces", "mdns", "worker port", "token",
                           "shard cache"}
    assert checks["mdns"]["status"] == "OK" and "127.0.0.1" in checks["mdns"]["detail"]
    assert checks["mlx backend"]["status"] == "OK" and p.returncode == 0


def test_streamed_text_equals_one_decode_of_all_tokens(tiny_dense):
    from mlx_lm.utils import load_tokenizer

    from mtpdist.engine.generate import _TextTail
    tok = load_tokenizer(tiny_dense[0])
    ids = tok.encode(" leading space, ünïcödé ✓ and € signs\n\tdone  ")
    tail, pieces = _TextTail(tok, ()), []
    for i in ids:                    # one token at a time, as decoding yields them
        pieces.append(tail.add([i])[0])
    pieces.append(tail.flush())
    assert "".join(pieces) == tok.decode(ids) == " leading space, ünïcödé ✓ and € signs\n\tdone  "
    cut = _TextTail(tok, ("€",))
    out = "".join(cut.add([i])[0] for i in ids) + cut.flush()
    assert out == " leading space, ünïcödé ✓ and " and cut.hit


def test_bench_writes_its_json(tiny_dense, tmp_path):
    out = tmp_path / "bench.json"
    mtpdist("bench", "--model", str(tiny_dense[0]), "--max-tokens", "8", "--repeats", "1", "--cycles", "3",
            "--out", str(out))
    r = json.loads(out.read_text())
    assert set(r["tps_median"]) == {"mlx_lm", "plain", "mtp"}
    assert r["mtp_tokens_equal_plain"] is True           # the bench checks correctness, not only speed
    for k in ("step_ms", "verify_ms", "draft_ms", "verify_over_step", "cycle_over_step"):
        assert r["pass_costs"][k] > 0
