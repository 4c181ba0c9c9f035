#!/usr/bin/env bash
# Regenerates everything under results/: steps 1-4 on the embedded default (the shipped
# pretrained backbone on split-digits), step 5 on a second, held-out-class stream. Two
# jobs at a time with one thread each: steps 1-4 about 1.5 hours on 2 CPU cores with the
# sweeps, 35 minutes without; step 5 about 1.5 hours (an estimate from its parts). Sweeps read validation data only; the
# comparisons read the test split.
#   SKIP_SWEEPS=1  skips the validation sweeps (steps 1 and 5); step 5 still pretrains its
#                  backbone (~9 minutes) and makes its two admission runs.
# Sweeps pin every option that differs between the defaults they chose and the defaults
# before them (e.g. "concat_pretrained": false for the sweeps run before it became the
# default), so each reproduces the figures in results/sweeps/*/sweep.md. Everything here
# was measured with the image-weighted ridge head, before the class-balanced one became
# the default: the cl-hres commands pass --no-balanced-head; a sweep reproduces its
# figures exactly with "balanced_head": false added to its --base.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
ALL=hres-nsp,hres,lora,lora-nsp,vpt,linear,finetune,joint,aper
S="python scripts/sweep.py --seeds 0,1"
# Sweeps run before dormant banks existed pin them off.
NOREF='"fwt_reference": false, "nsp_min_free_energy": 0'
OLD="$NOREF, \"concat_pretrained\": false"  # the sweeps of the previous default
NEW='"fwt_reference": false'  # sweeps run on the current defaults

# 1. Sweeps that chose the defaults: validation split (20% of train), never the test split.
if [ -z "${SKIP_SWEEPS:-}" ]; then
(
  # Head features [pretrained, adapted] vs adapted only, for the NSP strategies and APER.
  $S --out results/sweeps/concat --base "{\"strategy\": \"hres-nsp\", $NOREF}" \
     --grid '{"scenario": ["class", "task"], "concat_pretrained": [true, false], "nsp_threshold": [1e-4, 1e-6]}'
  $S --out results/sweeps/concat-first-session --base "{$NOREF, \"nsp_threshold\": 1e-4}" \
     --grid '{"scenario": ["class", "task"], "strategy": ["aper", "lora-nsp"], "concat_pretrained": [true, false]}'
  $S --out results/sweeps/concat-others --base "{$NOREF}" \
     --grid '{"strategy": ["joint", "hres", "lora"], "concat_pretrained": [true]}'
  $S --out results/sweeps/concat-vpt --base "{\"strategy\": \"vpt\", \"concat_pretrained\": true, $NOREF}" \
     --grid '{"lr": [1e-4, 1e-3]}'
  # The NSP threshold, both scenarios, with and without the concatenation.
  $S --out results/sweeps/nsp-threshold-concat \
     --base "{\"strategy\": \"hres-nsp\", \"concat_pretrained\": true, $NOREF}" \
     --grid '{"scenario": ["class", "task"], "nsp_threshold": [1e-3, 3e-4, 3e-5, 1e-5]}' --plot-x nsp_threshold
  for sc in class task; do  # what the experts read: the residual stream or its LayerNorm
    $S --out results/sweeps/hres-input-$sc \
       --base "{\"strategy\": \"hres-nsp\", \"hres_input\": \"norm\", \"scenario\": \"$sc\", $NOREF}" \
       --grid '{"nsp_threshold": [1e-4, 1e-5, 1e-6]}' --plot-x nsp_threshold
  done
  # The shipped threshold: 8 seeds (8 validation folds), one-standard-error rule.
  for sc in class task; do
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/nsp-threshold-1se-$sc \
      --base "{\"strategy\": \"hres-nsp\", \"scenario\": \"$sc\", $NOREF}" \
      --grid '{"nsp_threshold": [1e-4, 3e-5, 1e-5, 1e-6]}' --select nsp_threshold:min --plot-x nsp_threshold
    # The same under RanPAC's projection (docs/defaults.md).
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/nsp-threshold-1se-rp2000-$sc \
      --base "{\"strategy\": \"hres-nsp\", \"scenario\": \"$sc\", \"ridge_projection\": 2000, $NOREF}" \
      --grid '{"nsp_threshold": [1e-4, 3e-5, 1e-5, 1e-6]}' --select nsp_threshold:min --plot-x nsp_threshold
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/nsp-threshold-1se-lora-$sc \
      --base "{\"strategy\": \"lora-nsp\", \"scenario\": \"$sc\", $NOREF}" \
      --grid '{"nsp_threshold": [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]}' --select nsp_threshold:min --plot-x nsp_threshold
  done
  # H-Res's and LoRA's ranks (8 folds, one-SE rule, smallest rank that qualifies in
  # both scenarios; H-Res also on the random-init backbone), and the admission
  # threshold of dormant banks (flat: reported).
  for sc in class task; do
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/hres-rank-$sc \
      --base "{\"strategy\": \"hres-nsp\", \"scenario\": \"$sc\", $NEW}" \
      --grid '{"rank": [8, 16, 32, 64, 96]}' --select rank:min --plot-x rank
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/lora-nsp-rank-$sc \
      --base "{\"strategy\": \"lora-nsp\", \"scenario\": \"$sc\", $NEW}" \
      --grid '{"lora_rank": [4, 8, 16]}' --select lora_rank:min --plot-x lora_rank
    python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/nsp-min-free-energy-lora-$sc \
      --base "{\"strategy\": \"lora-nsp\", \"scenario\": \"$sc\", $NEW}" \
      --grid '{"nsp_min_free_energy": [0, 1e-6, 1e-5, 1e-4]}'
  done
  # Selective admission with looser thresholds (every setting: all banks dormant).
  python scripts/sweep.py --seeds 0,1,2,3 --out results/sweeps/nsp-selectivity-class \
    --base "{\"strategy\": \"hres-nsp\", $NEW}" \
    --grid '{"nsp_threshold": [1e-6, 1e-4, 1e-3], "nsp_min_selectivity": [0, 10, 100]}'
  python scripts/sweep.py --seeds 0,1,2,3 --out results/sweeps/hres-rank-random-init \
    --base "{\"strategy\": \"hres-nsp\", \"pretrained\": false, $NEW}" \
    --grid '{"rank": [32, 64]}' --select rank:min --plot-x rank
  # RanPAC's random ReLU projection before the ridge head (the head is shared: 0 unless
  # it helps the protected strategies).
  python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/ridge-projection --base "{$NOREF}" \
    --grid '{"strategy": ["hres-nsp", "linear"], "ridge_projection": [0, 1000, 2000]}' --select ridge_projection:min --plot-x ridge_projection
  python scripts/sweep.py --seeds 0,1,2,3,4,5,6,7 --out results/sweeps/ridge-projection-lora-nsp \
    --base "{$NOREF, \"strategy\": \"lora-nsp\"}" --grid '{"ridge_projection": [0, 1000, 2000]}' --select ridge_projection:min --plot-x ridge_projection
  $S --out results/sweeps/nsp-threshold \
     --base "{\"strategy\": \"hres-nsp\", \"nsp_rule\": \"relative\", $OLD}" \
     --grid '{"scenario": ["class", "task"], "nsp_threshold": [1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6]}' --plot-x nsp_threshold
) > results/sweeps-a.log 2>&1 &
(
  $S --out results/sweeps/nsp-energy --base "{\"strategy\": \"hres-nsp\", $OLD}" \
     --grid '{"nsp_rule": ["energy"], "nsp_threshold": [0.99, 0.999, 0.9999]}'
  $S --out results/sweeps/nsp-eta --base "{\"strategy\": \"hres-nsp\", \"nsp_threshold\": 1e-10, $OLD}" \
     --grid '{"nsp_eta": [0.9, 0.97, 0.99, 1.0]}' --plot-x nsp_eta
  $S --out results/sweeps/drift-compensation --base "{\"strategy\": \"hres-nsp\", $OLD}" \
     --grid '{"drift_compensation": [true, false], "nsp_rule": ["energy"], "nsp_threshold": [0.99, 0.999]}'
  $S --out results/sweeps/lr --base "{\"strategy\": \"hres-nsp\", \"nsp_threshold\": 1e-10, $OLD}" \
     --grid '{"lr": [3e-4, 1e-3, 3e-3]}'
  $S --out results/sweeps/joint-lr --base "{\"strategy\": \"joint\", $OLD}" --grid '{"lr": [1e-4, 3e-4, 1e-3]}'
  for s in lora vpt; do
    $S --out results/sweeps/$s-lr --base "{\"strategy\": \"$s\", $OLD}" --grid '{"lr": [1e-4, 1e-3]}'
  done
  $S --out results/sweeps/hres-drift-compensation --base "{\"strategy\": \"hres\", $OLD}" \
     --grid '{"drift_compensation": [true, false]}'
  $S --out results/sweeps/augment --base "{$OLD, \"nsp_threshold\": 1e-4}" \
     --grid '{"strategy": ["hres-nsp", "linear"], "augment": ["none", "crop"]}'
) > results/sweeps-b.log 2>&1 &
wait
fi

# 2. The targets: test split, 3 seeds, default settings; class- and task-incremental.
for sc in class task; do
  cl-hres compare --no-balanced-head --strategies $ALL --scenario $sc --seeds 0,1,2 \
    --out results/split-digits-$sc --overwrite --no-progress > results/split-digits-$sc.log 2>&1 &
done
wait
# LoRA and VPT at their validation-tuned learning rate (results/sweeps/{lora,vpt}-lr).
cl-hres compare --no-balanced-head --strategies lora,vpt --lr 1e-4 --seeds 0,1,2 \
  --out results/split-digits-class-lr1e-4 --overwrite --no-progress > /dev/null 2>&1 &
# The same stream on the same architecture, randomly initialised.
cl-hres compare --no-balanced-head --strategies hres-nsp,linear,joint,aper --no-pretrained --seeds 0,1,2 --no-fwt-reference \
  --out results/split-digits-class-random-init --overwrite --no-progress > /dev/null 2>&1 &
wait
# What the concatenation buys each strategy on the test split (its default is on).
cl-hres compare --no-balanced-head --strategies hres-nsp,lora-nsp,aper,joint --no-concat-pretrained --seeds 0,1,2 \
  --out results/split-digits-class-no-concat --overwrite --no-progress > /dev/null 2>&1

# 3. Claims of the paper on the pretrained backbone, against a VPT run of the same stream.
cl-hres analyze --run results/split-digits-class/hres-nsp/seed0 --other-run results/split-digits-class/vpt/seed0
cp results/split-digits-class/hres-nsp/seed0/analysis.md results/analysis-split-digits.md
cl-hres analyze --run results/split-digits-class/lora-nsp/seed0 > /dev/null
cp results/split-digits-class/lora-nsp/seed0/analysis.md results/analysis-lora-nsp.md

# 4. How selective the directions an NSP expert may learn in can be (validation data).
python scripts/nsp_selectivity.py --out results/nsp-selectivity --seed 0 --set '{"rank": 32}' > /dev/null
# The previous default (1e-4, rank 32, every open bank takes an expert), for the
# free-energy shares quoted in docs/results.md.
cl-hres run --no-balanced-head --nsp-threshold 1e-4 --rank 32 --nsp-min-free-energy 0 --no-fwt-reference --out results/threshold-1e-4/runs/seed0 --overwrite --no-progress > /dev/null 2>&1
cl-hres analyze --run results/threshold-1e-4/runs/seed0 > /dev/null
cp results/threshold-1e-4/runs/seed0/analysis.md results/analysis-threshold-1e-4.md

# 5. A second stream, with room for adaptation: Fashion-MNIST on a backbone pretrained on
# its classes 0-4 only (training images disjoint from the stream's; ~9 minutes), the
# shipped defaults unchanged (benchmarks/heldout-fmnist.yaml). About 1.5 hours.
H=results/heldout-fmnist
python scripts/pretrain_fmnist.py --epochs 15 --threads 1 --classes 0,1,2,3,4 --holdout 10000 \
  --stream-npz $H/stream.npz --out $H/backbone > /dev/null
HO="\"benchmark\": \"$H/stream.npz\", \"weights\": \"$H/backbone/fmnist.safetensors\", $NEW"
(
  if [ -z "${SKIP_SWEEPS:-}" ]; then  # validation split
    $S --out $H/sweeps/nsp-threshold --base "{\"strategy\": \"hres-nsp\", $HO}" \
       --grid '{"nsp_threshold": [1e-6, 1e-4, 1e-3, 1e-2]}' --plot-x nsp_threshold
    $S --out $H/sweeps/references --base "{$HO}" --grid '{"strategy": ["linear", "aper", "lora-nsp", "joint"]}'
    $S --out $H/sweeps/nsp-selectivity --base "{\"strategy\": \"hres-nsp\", $HO}" \
       --grid '{"nsp_threshold": [1e-4, 1e-3], "nsp_min_selectivity": [10, 100]}'
    # RanPAC's random projection before the ridge head (rp = 0: the rows above).
    $S --out $H/sweeps/ridge-projection --base "{$HO}" \
       --grid '{"strategy": ["hres-nsp", "linear"], "ridge_projection": [2000]}'
    # Four more folds, with and without the projection (paired by seed).
    for st in hres-nsp linear; do
      python scripts/sweep.py --seeds 2,3,4,5 --out $H/sweeps/ridge-projection-folds-$st \
        --base "{\"strategy\": \"$st\", $HO}" --grid '{"ridge_projection": [0, 2000]}'
    done
  fi
  cl-hres compare --no-balanced-head --strategies hres-nsp,linear --ridge-projection 2000 --seeds 0,1,2 --no-fwt-reference \
    --config benchmarks/heldout-fmnist.yaml --out $H/class-rp2000 --overwrite --no-progress
) > $H/sweeps.log 2>&1 &
side=$!
# Selectivity measured before training, per block and experience (validation, seed 0):
# the history's admission_free_energy / admission_old_free_energy.
for stream in digits heldout; do
  cfg=""; [ $stream = heldout ] && cfg="--config benchmarks/heldout-fmnist.yaml"
  cl-hres run --no-balanced-head $cfg --validation 0.2 --nsp-threshold 1e-4 --nsp-min-selectivity 10 --no-fwt-reference \
    --out $H/admission/$stream --overwrite --no-progress > /dev/null 2>&1
done
for sc in class task; do
  cl-hres compare --no-balanced-head --strategies hres-nsp,aper,linear,lora-nsp,joint --scenario $sc --seeds 0,1,2 \
    --config benchmarks/heldout-fmnist.yaml --out $H/$sc --overwrite --no-progress > $H/$sc.log 2>&1
done
wait "$side"  # fails the script if the sweeps or the projection comparison failed

# 6. Per-experience subspaces (EASE-style expansion) on both streams, validation data: the
# bound with exact old statistics against exemplar-free imputation and a two-stage head.
python scripts/subspace_bound.py --seeds 0,1,2,3 --out results/subspace-bound/split-digits > /dev/null
python scripts/subspace_bound.py --seeds 0,1 --set "{$HO}" --out results/subspace-bound/heldout-fmnist > /dev/null

# 7. The current defaults (class-balanced head), 5 seeds, test split; split-domains is
# built once into data/ (~25 s). Validation runs that chose hres-routed's routing weight
# and projection: docs/defaults.md (scripts/routing_weight.py reads a finished run).
D="--benchmark split-domains --data-root data"
cl-hres compare $D --strategies hres-routed,ranpac,aper,simplecil,joint,linear --seeds 0,1,2,3,4 \
  --no-fwt-reference --out results/split-domains-class --overwrite --no-progress > /dev/null
cl-hres compare $D --strategies hres-nsp --seeds 0,1 --no-fwt-reference \
  --out results/split-domains-class-hres-nsp --overwrite --no-progress > /dev/null
cl-hres compare --strategies hres-routed,ranpac,aper,simplecil,hres-nsp,linear,joint,l2p,dualprompt,coda-prompt \
  --seeds 0,1,2,3,4 --no-fwt-reference --out results/split-digits-class-balanced --overwrite --no-progress > /dev/null
cl-hres compare --config benchmarks/heldout-fmnist.yaml --strategies hres-routed,aper,ranpac,simplecil \
  --seeds 0,1,2 --no-fwt-reference --out $H/class-balanced --overwrite --no-progress > /dev/null
OMP_NUM_THREADS=1 cl-hres bench --config tiny --iters 5 --out results/bench-tiny-prompts > /dev/null
python scripts/subspace_bound.py --seeds 0 --set '{"benchmark": "split-domains", "data_root": "data"}' \
  --out results/subspace-bound/split-domains > /dev/null
