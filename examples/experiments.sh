#!/usr/bin/env bash
# The CPU experiments whose results are in the README ("Does it help?"), in the order run.
# Fashion-MNIST needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
set -euo pipefail
OUT=${OUT:-examples/runs}
run() { python -m examples.train "$@"; }

# digits (1,400 train / 397 test, 8x8): small CNN, SGD, standardized and raw [0, 255] pixels
run --dataset digits --model cnn --optimizer sgd --lr 0.05 --epochs 10 --batch-size 64 \
    --seeds 0 1 2 3 4 --out "$OUT/digits_cnn_sgd"
run --dataset digits --model cnn --optimizer sgd --lr 0.05 --epochs 10 --batch-size 64 \
    --standardize raw255 --seeds 0 1 2 3 4 --out "$OUT/digits_cnn_sgd_raw255"
# digits, ViT-Tiny with a 2x2 patch embedding, Adam
run --dataset digits --model vit_tiny --patch 2 --optimizer adam --lr 1e-3 --epochs 5 \
    --batch-size 64 --seeds 0 1 --out "$OUT/digits_vit_adam"
# Fashion-MNIST (60,000 / 10,000, 28x28): small CNN, Adam, standardized and raw pixels
run --dataset fashion_mnist --model cnn --optimizer adam --lr 1e-3 --epochs 3 --batch-size 128 \
    --seeds 0 1 2 --out "$OUT/fmnist_cnn_adam"
run --dataset fashion_mnist --model cnn --optimizer adam --lr 1e-3 --epochs 3 --batch-size 128 \
    --standardize raw255 --seeds 0 1 2 --out "$OUT/fmnist_cnn_adam_raw255"
