#!/usr/bin/env bash
# On the device machine (16 cores, nothing else running): the ring's overhead per stage
# (`bench --scenario hop`) with the coordinator and every worker pinned to 3 cores of their
# own, MLX on CPU: separate cores stand in for separate Macs, as this 2-core box cannot.
# `before` = an exported tree of an earlier main (BEFORE_DIR, default .before: b4c2c7b, before
# the ring), carried along and run in the same call, alternating with the current tree. Wheels (Python 3.12: mlx, mlx-cpu,
# mlx-lm, grpcio, protobuf, zeroconf, ifaddr, cryptography, cffi, pycparser,
# prometheus-client, tqdm) carried in .whlcpu.
# usage: scripts/device_hop_cpu.sh OUT_DIR [SESSIONS] [BEFORE_DIR] [WORKER_COUNTS]
set -euo pipefail
out=${1:?out dir}; sessions=${2:-2}; before=${3:-.before}; counts=${4:-2 4}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whlcpu/*.whl
ln -sfn ../worker mtpdist/worker; ln -sfn ../coordinator mtpdist/coordinator
ln -sfn ../worker "$before/mtpdist/worker"; ln -sfn ../coordinator "$before/mtpdist/coordinator"
model=$PWD/mtpdist/demo_model
nproc; python3 -c 'import os; print(len(os.sched_getaffinity(0)), "cores usable")'
hop() {  # tree label workers session
  # run from the tree itself: `python -m` puts the working directory first on sys.path
  (cd "$1" && PYTHONPATH=/tmp/site:$1 PYTHONUNBUFFERED=1 python3 -m mtpdist.cli bench --model "$model" --scenario hop \
    --workers "$3" --pin-cores 3 --max-tokens 32 --repeats 3 --out "$out/hop-cpu-pinned-$3w-$2-$4.json" \
    | python3 -c "import json,sys; d=json.load(sys.stdin); print('$2', '$3 workers', d['overhead_per_stage_us'], d['runs_us'])")
  date +%T
  # The device's reply caps how many files come back: with ARCHIVE set, every result so far in one file.
  if [[ -n "${ARCHIVE:-}" ]]; then tar -C "$out" -czf "$ARCHIVE" .; fi
}
for s in $(seq 1 "$sessions"); do
  for w in $counts; do
    if (( s % 2 )); then hop "$PWD" after $w $s; hop "$PWD/$before" before $w $s
    else hop "$PWD/$before" before $w $s; hop "$PWD" after $w $s; fi
  done
done
