#!/usr/bin/env bash
# The grid behind the README's "When does TrAct help?", in the order run (2-core CPU).
# Fashion-MNIST needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
# STAGE=1: the claims' cells; STAGE=2: the λ sweep and 5-seed reruns chosen from stage 1;
# ... STAGE=6: the longer budgets of issue 21; STAGE=7: the headline cell on all 60,000 images;
# STAGE=merge: 5-seed cells from seeds 0-2 and 3-4; STAGE=trend: the budget trend from the
# committed cells; STAGE=gpu: issue 21's longest budgets on an accelerator.
set -euo pipefail
OUT=${OUT:-examples/runs/study}
STAGE=${STAGE:-1}
run() {  # a cell already done (its study.json exists) is not run again
  local name=$1; shift
  if [ -f "$OUT/$name/study.json" ]; then return; fi
  mkdir -p "$OUT/$name"
  python -m examples.study --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name/log.txt"
}

fm=(--dataset fashion_mnist --train-size 10000 --budgets 1 2 4 --batch-size 128)
dg=(--dataset digits --budgets 5 10 20 --batch-size 64 --seeds 0 1 2 3 4)
vit=(--model vit --label-smoothing 0.1)
if [ "$STAGE" = 1 ]; then
  # 1. ViT patch embeddings with a large fan-in (n = 49, 196), Adam
  run fm_vit7_adam        "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3
  # 2. unnormalized inputs: [0, 255] pixels
  run fm_vit7_adam_raw255 "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 --standardize raw255
  run fm_vit14_adam       "${fm[@]}" "${vit[@]}" --patch 14 --optimizer adam --lr 1e-3
  # 3. a conv stem with no normalization after it, standardized and raw
  run fm_cnnnn_adam        "${fm[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3
  run fm_cnnnn_adam_raw255 "${fm[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3 --standardize raw255
  # 4. optimizers: SGD, and the first layer by SGD with the rest by Adam (plain arm = control)
  run fm_vit7_sgd          "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd --lr 0.03
  run fm_vit7_sgdadam_f01  "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.01
  run fm_vit7_sgdadam_f1   "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1
  # digits (1,400 train images, 8x8): the same claims, 5 seeds
  run dg_vit4_adam         "${dg[@]}" "${vit[@]}" --patch 4 --optimizer adam --lr 1e-3
  run dg_vit4_adam_raw255  "${dg[@]}" "${vit[@]}" --patch 4 --optimizer adam --lr 1e-3 --standardize raw255
  run dg_cnnnn_adam        "${dg[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3
  run dg_cnnnn_adam_raw255 "${dg[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3 --standardize raw255
  run dg_vit4_sgd          "${dg[@]}" "${vit[@]}" --patch 4 --optimizer sgd --lr 0.03
  run dg_vit4_sgdadam_f01  "${dg[@]}" "${vit[@]}" --patch 4 --optimizer sgd_adam --lr 1e-3 --first-lr 0.01
  run dg_vit4_sgdadam_f1   "${dg[@]}" "${vit[@]}" --patch 4 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1
fi
if [ "$STAGE" = 2 ]; then
  # seeds 3 and 4 where stage 1's differences were within two standard errors (merged below)
  more=(--seeds 3 4)
  run fm_vit7_adam_s34        "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 "${more[@]}"
  run fm_vit7_adam_raw255_s34 "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 --standardize raw255 "${more[@]}"
  run fm_vit14_adam_s34       "${fm[@]}" "${vit[@]}" --patch 14 --optimizer adam --lr 1e-3 "${more[@]}"
  # the λ sweep at the effect stage 1 found largest (ViT, patch 7, Adam), short budgets, 5 seeds
  run fm_vit7_adam_lams "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 \
      --budgets 1 2 --seeds 0 1 2 3 4 --lams 0.025 0.05 0.1 0.2 0.4
  # [0, 255] pixels with the first layer by SGD (TrAct's step in Z does not scale with the
  # pixels there, plain SGD's does) and the rest by Adam; the plain arm is the control
  run fm_vit7_sgdadam_f01_raw255 "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.01 --standardize raw255
  run fm_vit7_sgdadam_f1_raw255  "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 --standardize raw255
fi
if [ "$STAGE" = 3 ]; then
  # Why TrAct trails plain Adam on [0, 255] pixels: λ is tiny next to XᵀX/b there (pixel
  # scale 255² ≈ 65025), so TrAct nearly whitens the input; λ = 6500 is λ = 0.1 in [0, 1] units
  run fm_vit7_adam_raw255_biglams "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 \
      --standardize raw255 --budgets 1 2 --lams 0.1 10 1000 6500
fi
if [ "$STAGE" = 4 ]; then
  # the λ sweep again where stages 1-2 found the largest gain: the first layer by SGD (lr 0.1)
  run fm_vit7_sgdadam_f1_lams "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 \
      --first-lr 0.1 --budgets 1 2 --lams 0.025 0.05 0.1 0.2 0.4
fi
if [ "$STAGE" = 5 ]; then
  # seeds 3 and 4 for the remaining cells whose differences were within two standard errors
  more=(--seeds 3 4)
  run fm_vit7_sgdadam_f1_s34  "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 "${more[@]}"
  run fm_vit7_sgdadam_f01_s34 "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.01 "${more[@]}"
  run fm_vit7_sgd_s34         "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd --lr 0.03 "${more[@]}"
  run fm_cnnnn_adam_s34        "${fm[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3 "${more[@]}"
  run fm_cnnnn_adam_raw255_s34 "${fm[@]}" --model cnn_nonorm --optimizer adam --lr 1e-3 --standardize raw255 "${more[@]}"
fi
if [ "$STAGE" = 6 ]; then
  # issue 21: does the gain grow, hold or fade with the budget? The same cells at 1-16 epochs
  # (each budget a full cosine run: 31 epochs per seed and arm). On the 2-core CPU the first
  # cells took the wall time in their study.json (seeds 0-2: 8-24 min, 3-4: 6-15 min).
  long=(--budgets 1 2 4 8 16 --seeds 0 1 2)
  run fm_vit7_sgdadam_f1_long "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 "${long[@]}"
  run fm_vit7_sgdadam_f1_long_s34 "${fm[@]}" "${vit[@]}" --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 \
      --budgets 1 2 4 8 16 --seeds 3 4
  run fm_vit7_adam_long       "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 "${long[@]}"
  run fm_vit14_adam_long      "${fm[@]}" "${vit[@]}" --patch 14 --optimizer adam --lr 1e-3 "${long[@]}"
  run fm_vit7_adam_raw255_long "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 \
      --standardize raw255 --budgets 8 16 --seeds 0 1 2
  # seeds 3 and 4 where the 3-seed differences were within two standard errors (merged below)
  run fm_vit7_adam_long_s34   "${fm[@]}" "${vit[@]}" --patch 7 --optimizer adam --lr 1e-3 \
      --budgets 1 2 4 8 16 --seeds 3 4
  run fm_vit14_adam_long_s34  "${fm[@]}" "${vit[@]}" --patch 14 --optimizer adam --lr 1e-3 \
      --budgets 1 2 4 8 16 --seeds 3 4
fi
if [ "$STAGE" = merge ]; then
  for cell in fm_vit7_adam fm_vit7_adam_raw255 fm_vit14_adam fm_vit7_sgdadam_f1 \
      fm_vit7_sgdadam_f01 fm_vit7_sgd fm_cnnnn_adam fm_cnnnn_adam_raw255 fm_vit7_sgdadam_f1_long \
      fm_vit7_adam_long fm_vit14_adam_long; do
    if [ -f "$OUT/${cell}_s34/study.json" ]; then
      python -m examples.study --merge "$OUT/$cell/study.json" "$OUT/${cell}_s34/study.json" \
        --out "$OUT/${cell}_5seeds"
    fi
  done
fi
if [ "$STAGE" = 7 ]; then
  # issue 21: is stage 6's fade the 10,000-image subset? The same cell on all 60,000 training
  # images: 4 epochs there are 1,872 steps, more than 16 epochs of the subset (1,248)
  run fm60k_vit7_sgdadam_f1 --dataset fashion_mnist --budgets 1 2 4 --batch-size 128 "${vit[@]}" \
      --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 --seeds 0 1 2
  run fm60k_vit7_sgdadam_f1_e8 --dataset fashion_mnist --budgets 8 --batch-size 128 "${vit[@]}" \
      --patch 7 --optimizer sgd_adam --lr 1e-3 --first-lr 0.1 --seeds 0 1 2
fi
if [ "$STAGE" = gpu ]; then
  # issue 21 on an accelerator (one device call): the headline and Adam cells on all 60,000
  # images up to 32 epochs, seeds vmapped. DATA: a folder with the IDX files, e.g. a copy of
  # /usr/share/datasets/fashion-mnist carried in an ignored folder (30 MB).
  full=(--dataset fashion_mnist --data-dir "${DATA:-/usr/share/datasets/fashion-mnist}"
        --batch-size 128 --budgets 1 2 4 8 16 32 --seeds 0 1 2 3 4 "${vit[@]}" --patch 7)
  run gpu_fm60k_vit7_sgdadam_f1 "${full[@]}" --optimizer sgd_adam --lr 1e-3 --first-lr 0.1
  run gpu_fm60k_vit7_adam       "${full[@]}" --optimizer adam --lr 1e-3
fi
if [ "$STAGE" = trend ]; then
  # the README's and the study page's table and plot of TrAct − plain against the budget,
  # from the committed cells (a budget run in two cells is taken from the one with more seeds)
  r=examples/study_results
  python -m examples.trend \
    $r/fm_vit7_sgdadam_f1_long_5seeds/study.json $r/fm60k_vit7_sgdadam_f1/study.json \
    $r/fm60k_vit7_sgdadam_f1_e8/study.json \
    $r/fm_vit7_adam_long_5seeds/study.json $r/fm_vit14_adam_long_5seeds/study.json \
    $r/fm_vit7_adam_raw255_5seeds/study.json $r/fm_vit7_adam_raw255_long/study.json \
    --labels 'p7, SGD first layer' 'p7, SGD first layer, 60k images' 'p7, Adam' 'p14, Adam' \
      'p7, Adam, [0, 255]' \
    --out docs/results/trend
fi
