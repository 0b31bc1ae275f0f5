#!/usr/bin/env bash
# Issue 25's target rows ("no cliffs"), one after another, as BENCHMARKS.md's "No cliffs" sections
# report them: run from the repository root with nothing else on the machine; OUT=folder for the
# outputs (default runs/no-cliffs). Takes about 12 minutes on a 2-core machine.
set -u
OUT=${OUT:-runs/no-cliffs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
git rev-parse --short HEAD > "$OUT/rev"
date -u > "$OUT/start"
python3 -m compileall -q anycnn
# fill the compiled-kernel cache first (untimed)
anycnn bench --model resnet20 --batch-sizes 32 128 --rounds 1 --steps 2 > /dev/null 2>&1
anycnn bench --model simple-cnn --batch-sizes 64 128 256 --rounds 1 --steps 2 --input-grad > /dev/null 2>&1
repo=$(pwd)
cd "$(mktemp -d)"
for i in 1 2 3; do
  for n in 1 0; do
    /usr/bin/time -f "native=$n wall %e s maxrss %M KB" env ANYCNN_NATIVE=$n anycnn train --quiet \
      >> "$OUT/train.txt" 2>&1
  done
done
cd "$repo"
anycnn bench --model resnet20 --batch-sizes 32 --first-step --rounds 3 --steps 10 > "$OUT/firststep.txt" 2>&1
anycnn bench --model simple-cnn --batch-sizes 64 256 --input-grad --rounds 3 --steps 10 > "$OUT/inputgrad.txt" 2>&1
for m in lenet5 bn-cnn resnet-mini resnet20 resnet20-code; do  # every preset, batch 64
  anycnn bench --model $m --batch-sizes 64 --input-grad --rounds 3 --steps 10 >> "$OUT/inputgrad-presets.txt" 2>&1
done
for m in simple-cnn resnet20; do
  anycnn bench --infer --model $m --batch-sizes 64 128 --rounds 3 > "$OUT/infer-$m.txt" 2>&1
done
for m in simple-cnn resnet20; do
  for r in 1 2; do
    for b in numpy torch; do
      anycnn bench --backend $b --model $m --batch-sizes 64 --rounds 2 --steps 10 >> "$OUT/backend-$m.txt" 2>&1
    done
  done
done
anycnn bench --model resnet20 --batch-sizes 32 128 --compare-torch --rounds 3 > "$OUT/resnet20-torch.txt" 2>&1
anycnn bench --model simple-cnn --batch-sizes 64 256 --compare-torch --rounds 3 > "$OUT/simple-torch.txt" 2>&1
date -u > "$OUT/end"
