#!/usr/bin/env bash
# On the device machine, after the first two prepare-mlx-cuda carries: finish the MLX CUDA
# install, then aggregate tok/s of 1/4/8/16 concurrent streams (MTP off and on) with every
# layer in one process on the GPU, for a Qwen3.5-0.8B-shaped random model in bf16.
# Carry .mlxcuda3 and .whl2 (grpcio, protobuf, zeroconf, ifaddr, cryptography, cffi, pycparser).
# usage: scripts/device_streams_gpu.sh OUT_DIR [SIZE]
set -euo pipefail
out=${1:?out dir}; size=${2:-0.8b}
cp .mlxcuda3/* /root/keep/
(cd /root/keep && cat part.a* > mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl \
  && python3 -m pip install -q --no-index --no-deps --target /root/site mlx-0.32.4-*.whl mlx_cuda_13-*.whl mlx_lm-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site2 .whl2/*.whl
export PYTHONPATH=/root/site:/root/site2:$PWD PYTHONUNBUFFERED=1
ln -sfn ../worker mtpdist/worker; ln -sfn ../coordinator mtpdist/coordinator
python3 - "$size" <<'PY'
import sys
from pathlib import Path
from mtpdist.model.convert import ConvertOptions, convert
from mtpdist.model.synthetic import make_synthetic
raw = make_synthetic(Path("/tmp/raw"), sys.argv[1])
print(convert(raw, Path("/tmp/bf16"), ConvertOptions(dtype="bfloat16")))
PY
python3 -m mtpdist.cli bench --model /tmp/bf16 --scenario streams --workers 0 --streams 1,4,8,16 --mtp-depth 1 \
  --max-tokens 32 --repeats 1 --out "$out/gpu-streams-$size.json" | python3 -c '
import json, sys; d = json.load(sys.stdin); print(d["aggregate_tps"], d["acceptance"], d.get("mtp_over_plain"))'
