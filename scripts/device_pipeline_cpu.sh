#!/usr/bin/env bash
# On the device machine (16 cores): real-compute pipeline figures with every process pinned
# to cores of its own, MLX on CPU. Needs the wheels in .whl (mlx, mlx-cpu, mlx-lm, grpcio,
# protobuf, zeroconf, ifaddr); see BENCHMARKS.md for the call that carries them.
# usage: scripts/device_pipeline_cpu.sh OUT_DIR [SIZE] [MAX_TOKENS]
set -euo pipefail
out=${1:?out dir}; size=${2:-medium}; n=${3:-24}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
ln -sfn ../worker mtpdist/worker; ln -sfn ../coordinator mtpdist/coordinator
python3 -m mtpdist.cli synth --out /tmp/model-$size --size "$size" >/dev/null
for w in 0 2 4; do
  python3 -m mtpdist.cli bench --model /tmp/model-$size --scenario streams --workers $w --pin-cores 3 \
    --streams 1,2 --mtp-depth none --max-tokens "$n" --repeats 1 --out "$out/cpu-pinned-$size-w$w.json" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["workers"], d["aggregate_tps"])'
done
