#!/usr/bin/env bash
# The paper's CIFAR-10 protocol (Figure 1 of Petersen, Borgelt, Ermon, NeurIPS 2024), for a
# GPU/TPU machine. Each command trains ResNet-18 (CIFAR variant: 3x3/1 stem, no bias, the 3x3/2
# max-pool kept) twice from the same seed, plain and with TrAct (λ = 0.1), batch 128, cosine
# schedule per step, random crop (padding 4) + horizontal flip, inputs standardized per channel.
#
# What the paper reports (arXiv 2410.23970, Figure 1 and Section 4): with Adam, TrAct at 100
# epochs matches plain training at 400 epochs (a 4x speedup); across its experiments the speedups
# range from 1.25x to 4x. This script has NOT been run to completion by us (no accelerator was
# available); on a 2-core CPU one ResNet-18 step of batch 32 takes seconds, so a 100-epoch run
# would take weeks. The paper's weight decay is not stated here; add --weight-decay if you use one.
#
# Usage: DATA=/path/with/cifar-10-batches-py SEEDS="0 1 2" bash examples/reproduce_cifar10.sh
set -euo pipefail
DATA=${DATA:?set DATA to the folder holding cifar-10-batches-py}
SEEDS=${SEEDS:-0}
OUT=${OUT:-examples/runs/cifar10}
common=(--dataset cifar10 --data-dir "$DATA" --model resnet18 --batch-size 128 --augment
        --lam 0.1 --seeds $SEEDS)

for epochs in 100 200 400 800; do
  # SGD, momentum 0.9, lr 0.08 (every budget)
  python -m examples.train "${common[@]}" --optimizer sgd --lr 0.08 --epochs "$epochs" \
    --out "$OUT/sgd_e$epochs"
  # Adam: lr 0.01 for 100 and 200 epochs, 0.001 for 400 and 800
  lr=0.01; if [ "$epochs" -ge 400 ]; then lr=0.001; fi
  python -m examples.train "${common[@]}" --optimizer adam --lr "$lr" --epochs "$epochs" \
    --out "$OUT/adam_e$epochs"
done
