#!/usr/bin/env bash
# Self-distil the demo model's MTP head on the device machine (MLX CUDA), three heads side by side:
# "one" keeps the released head's shape (1 layer), "two" and "three" grow it to 2 and 3 layers (new
# ones start as the identity). All train on the same generated continuations, in the background, so
# the work can span two calls:
#   bash scripts/device_distill.sh start SECONDS     # generate, launch the three, return after ~9 minutes
#   bash scripts/device_distill.sh finish OUTDIR     # wait for all, heads + stats into OUTDIR/heads.tar
# Needs MLX CUDA on PYTHONPATH (../shared/tools/prepare-mlx-cuda) and .demo_data (bundled tokenizer).
set -euo pipefail
w=/root/distill
cmd=$1 arg=$2
train() {  # name layers lr
  setsid nohup python3 scripts/demo_distill.py distill --model mtpdist/demo_model --data .demo_data \
      --out $w/$1 --gen-file $w/gen.npy --seconds "$arg" --mtp-layers $2 --lr $3 \
      --chain 1 0.8 0.7 0.6 --alphas 0.0 > $w/$1.log 2>&1 < /dev/null &
}
if [ "$cmd" = start ]; then
  mkdir -p $w && t0=$(date +%s)
  python3 scripts/demo_distill.py distill --model mtpdist/demo_model --data .demo_data --out $w/gen \
      --gen-file $w/gen.npy --gen-batch 64 --gen-seconds 170 --seconds 0 > $w/gen.log 2>&1
  tail -2 $w/gen.log
  train one 1 3e-4
  train two 2 5e-4
  train three 3 5e-4
  while [ $(( $(date +%s) - t0 )) -lt 540 ]; do sleep 10; done
  tail -n 3 $w/one.log $w/two.log $w/three.log
else
  while pgrep -f demo_distill.py > /dev/null; do sleep 5; done
  tail -n 4 $w/one.log $w/two.log $w/three.log
  mkdir -p "$arg" $w/pack
  for n in one two three; do
    cp $w/$n/mtp-alpha0.0.safetensors $w/pack/mtp-$n.safetensors
    cp $w/$n/distill_stats.json $w/pack/distill-$n.json
    cp $w/$n.log $w/pack/distill-$n.log
  done
  tar -C $w/pack -cf "$arg/heads.tar" .   # one file: the device's reply caps how many files come back
fi
