#!/usr/bin/env bash
# On the device machine, MLX on its GPU: the ring's overhead per stage (`bench --scenario hop`,
# 2 workers, demo model), `before` (an exported earlier tree, BEFORE_DIR) alternated with the
# current tree in one call. One stream: the stages never compute at once, so the workers may
# share the one GPU for this figure (not for one-stream efficiency, which needs a GPU each).
# Expects mlx + mlx-cuda (../shared/tools/prepare-mlx-cuda) and the other wheels (.devdeps:
# grpcio, protobuf, zeroconf, ifaddr, cryptography, cffi, pycparser, prometheus-client, tqdm)
# installed in /root/site.
# usage: scripts/device_hop_gpu.sh OUT_DIR PAIRS BEFORE_DIR   (ARCHIVE=file: all results in one)
set -euo pipefail
out=${1:?out dir}; pairs=${2:-2}; before=${3:?before tree}
ln -sfn ../worker mtpdist/worker; ln -sfn ../coordinator mtpdist/coordinator
ln -sfn ../worker "$before/mtpdist/worker"; ln -sfn ../coordinator "$before/mtpdist/coordinator"
model=$PWD/mtpdist/demo_model
hop() {  # tree label pair
  (cd "$1" && PYTHONPATH=/root/site:$1 PYTHONUNBUFFERED=1 python3 -m mtpdist.cli bench --model "$model" \
    --scenario hop --workers 2 --max-tokens 32 --repeats 3 --out "$out/hop-gpu-2w-$2-$3.json" \
    | python3 -c "import json,sys; d=json.load(sys.stdin); print('$2', d['overhead_per_stage_us'], d['runs_us'])")
  date +%T
  if [[ -n "${ARCHIVE:-}" ]]; then tar -C "$out" -czf "$ARCHIVE" .; fi
}
for p in $(seq 1 "$pairs"); do
  if (( p % 2 )); then hop "$PWD" after $p; hop "$PWD/$before" before $p
  else hop "$PWD/$before" before $p; hop "$PWD" after $p; fi
done
