#!/usr/bin/env bash
# lightly's CIFAR-10 benchmark in selfsup (docs/REPRODUCTIONS.md, "lightly's CIFAR-10 benchmark"): pretrain SimCLR,
# MoCo v2 and BYOL with the recipes of configs/lightly/ on the 50,000 CIFAR-10 train images at one budget, then
# score each, and a random-init copy of the backbone, with the weighted kNN (k = 200, T = 0.1; bank: the train
# images, queries: the 10,000 test images). Every figure lands in the results store (selfsup results).
#
#   SELFSUP_DATA=../shared/data bash benchmarks/lightly_cifar10.sh [EPOCHS] [WIDTH] [OUT] [METHOD ...]
#
# lightly's own runs: width 1, 200 epochs, batch 512, one A6000. Killed, the same command resumes every run.
set -euo pipefail
epochs=${1:-4}
width=${2:-0.25}
out=${3:-runs/lightly-c10}
shift $(( $# < 3 ? $# : 3 ))
methods=("${@:-simclr moco_v2 byol}")
read -r -a methods <<< "${methods[*]}"
for m in "${methods[@]}"; do
  selfsup pretrain "$m" --config "lightly/${m}_cifar10" --data cifar10 --width "$width" --epochs "$epochs" \
      --batch-size 512 --out "$out/$m-w$width-e$epochs"
  selfsup evaluate "$out/$m-w$width-e$epochs" --data cifar10 --protocol knn
done
selfsup evaluate "$out/${methods[0]}-w$width-e$epochs" --data cifar10 --protocol knn --random-init
selfsup results --dataset cifar10 --protocol knn
