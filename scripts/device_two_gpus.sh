#!/usr/bin/env bash
# On the device's 2-GPU machine: one stream of a Qwen3.5-9B-shaped model (random weights,
# 4-bit) in one process on one GPU, then through 2 local workers on a GPU each (the
# coordinator shares GPU 0, as a coordinator Mac also serves), and the ring's overhead per
# stage there (`bench --scenario hop`). After the first two prepare-mlx-cuda carries;
# carry .mlxcuda3 and .whl2 (grpcio, protobuf, zeroconf, ifaddr, cryptography, cffi,
# pycparser, prometheus-client, tqdm: the machine's own grpcio is older than the stubs need).
# usage: scripts/device_two_gpus.sh OUT_DIR [SIZE] [MAX_TOKENS]
set -euo pipefail
out=${1:?out dir}; size=${2:-9b}; n=${3:-64}
cp .mlxcuda3/* /root/keep/
(cd /root/keep && cat part.a* > mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl \
  && python3 -m pip install -q --no-index --no-deps --target /root/site mlx-0.32.4-*.whl mlx_cuda_13-*.whl mlx_lm-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site2 .whl2/*.whl
export PYTHONPATH=/root/site:/root/site2:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
ln -sfn ../worker mtpdist/worker; ln -sfn ../coordinator mtpdist/coordinator
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
python3 - "$size" <<'PY'
import sys
import mlx.core as mx
from mtpdist.model.config import ModelConfig
from mtpdist.model.synthetic import make_config, random_weights, to_raw_hf, write_checkpoint
raw = make_config(sys.argv[1])
# bf16 random weights: half the bytes of `mtpdist synth` (fp32) to write and read back
print(write_checkpoint("/tmp/raw", raw, to_raw_hf(random_weights(ModelConfig.from_dict(raw), dtype=mx.bfloat16)),
                       shards=8))
PY
python3 -m mtpdist.cli convert --hf-path /tmp/raw --mlx-path /tmp/q4 -q --q-bits 4 >/dev/null
rm -rf /tmp/raw
echo "model built in $(( $(date +%s) - t0 )) s"; du -sh /tmp/q4
common=(--model /tmp/q4 --max-tokens "$n" --repeats 2)
python3 -m mtpdist.cli bench "${common[@]}" --scenario streams --streams 1 --mtp-depth none --workers 0 \
  --out "$out/two-gpus-$size-w0.json" | python3 -c 'import json,sys; print("one process", json.load(sys.stdin)["aggregate_tps"])'
python3 -m mtpdist.cli bench "${common[@]}" --scenario streams --streams 1 --mtp-depth none --workers 2 \
  --worker-gpus 0,1 --out "$out/two-gpus-$size-w2.json" | python3 -c 'import json,sys; print("2 workers", json.load(sys.stdin)["aggregate_tps"])'
python3 -m mtpdist.cli bench "${common[@]}" --scenario hop --workers 2 --worker-gpus 0,1 \
  --out "$out/two-gpus-$size-hop.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("hop", d["overhead_per_stage_us"], d["runs_us"])'
