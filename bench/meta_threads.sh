#!/bin/bash
# Torch threads per meta-training run: one run alone, then two side by side, at 1 and at 2 threads each.
#   METALR_DATA_DIR=../shared/data bash bench/meta_threads.sh [RECIPE] [META_STEPS]
# Prints one wall-clock line per measurement; run it on an otherwise idle machine (BENCHMARKS.md).
set -eu
recipe=${1:-meta_train/adam-pes-long.yaml}
steps=${2:-30}
metalr=${METALR:-.venv/bin/metalr}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
run() {  # run THREADS SEED OUT
    OMP_NUM_THREADS=$1 "$metalr" meta-train "$recipe" seed="$2" meta.meta_steps="$steps" meta.checkpoint_every=0 \
        meta.state_every=0 --threads "$1" --no-progress --out "$3" > /dev/null
}
for rep in 1 2; do
    for threads in 1 2; do
        start=$(date +%s.%N)
        run "$threads" 0 "$scratch/alone-$rep-$threads"
        echo "alone threads=$threads rep=$rep wall=$(echo "$(date +%s.%N) - $start" | bc) s"
    done
done
for rep in 1 2; do
    for threads in 1 2; do
        start=$(date +%s.%N)
        run "$threads" 0 "$scratch/a-$rep-$threads" & run "$threads" 1 "$scratch/b-$rep-$threads" & wait
        echo "pair threads=$threads rep=$rep wall=$(echo "$(date +%s.%N) - $start" | bc) s"
    done
done
