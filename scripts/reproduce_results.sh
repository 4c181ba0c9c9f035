#!/usr/bin/env bash
# Regenerates everything under results/ (about 20 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1
ALL=hres-nsp,hres,lora,lora-nsp,vpt,linear,finetune,joint
# The targets: test split, 3 seeds, default settings.
for sc in class task; do
  cl-hres compare --strategies $ALL --scenario $sc --seeds 0,1,2 --out results/split-digits-$sc --overwrite --no-progress
done
# Joint training and LoRA-NSP at their validation-tuned learning rate
# (results/sweeps/joint-lr, results/sweeps/lora-nsp).
for sc in class task; do
  for st in joint lora-nsp; do
    cl-hres compare --strategies $st --lr 3e-4 --scenario $sc --seeds 0,1,2 --out results/split-digits-$sc-$st-lr3e-4 --overwrite --no-progress
  done
done
# Claims of the paper on the default run and a VPT run of the same stream.
cl-hres analyze --run results/split-digits-class/hres-nsp/seed0 --other-run results/split-digits-class/vpt/seed0
cp results/split-digits-class/hres-nsp/seed0/analysis.md results/analysis-split-digits.md
# Sweeps that chose the defaults: validation split (20% of train), never the test split.
S="python scripts/sweep.py --seeds 0,1"
$S --out results/sweeps/nsp-threshold --base '{"strategy": "hres-nsp", "nsp_rule": "relative"}' \
   --grid '{"nsp_threshold": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12]}' --plot-x nsp_threshold
$S --out results/sweeps/nsp-energy --base '{"strategy": "hres-nsp"}' \
   --grid '{"nsp_rule": ["energy"], "nsp_threshold": [0.99, 0.999, 0.9999, 0.99999]}'
$S --out results/sweeps/nsp-ratio --base '{"strategy": "hres-nsp"}' \
   --grid '{"nsp_rule": ["ratio"], "nsp_threshold": [10, 30, 1000, 1000000]}'
$S --out results/sweeps/nsp-eta --base '{"strategy": "hres-nsp"}' --grid '{"nsp_eta": [0.9, 0.99, 1.0]}'
$S --out results/sweeps/ridge-head --base '{"strategy": "hres-nsp"}' \
   --grid '{"ridge": [1e-2, 1e-4, 1e-6, "auto"], "ridge_projection": [0, 2048]}'
$S --out results/sweeps/head --base '{"strategy": "hres-nsp"}' --grid '{"head": ["ridge", "ncm", "linear"]}'
$S --out results/sweeps/lr --base '{"strategy": "hres-nsp"}' --grid '{"lr": [3e-4, 1e-3, 3e-3]}'
for s in lora vpt; do
  $S --out results/sweeps/$s-lr --base "{\"strategy\": \"$s\"}" --grid '{"lr": [1e-4, 3e-4, 1e-3, 3e-3]}'
done
$S --out results/sweeps/lora-nsp --base '{"strategy": "lora-nsp"}' \
   --grid '{"nsp_threshold": [1e-10, 1e-8, 1e-6, 1e-4], "lr": [3e-4, 1e-3, 3e-3]}'
$S --out results/sweeps/joint-lr --base '{"strategy": "joint"}' --grid '{"lr": [1e-4, 3e-4, 1e-3, 3e-3], "epochs": [1, 5]}'
# Costs (ViT-S/16 layout at 224 px, r = 32, batch 16 on this CPU).
cl-hres bench --config vit-s --batch-size 16 --iters 3 --out results/bench-cpu
